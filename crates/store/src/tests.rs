use serde_json::json;

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("state.db")).unwrap();
    (dir, store)
}

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

#[test]
fn images_resolve_by_name_digest_and_prefix() {
    let (_dir, store) = store();
    store.record_image("web", D1, 10, 1).unwrap();
    store.record_image("web", D2, 20, 2).unwrap();
    store.record_image("web", D2, 20, 3).unwrap();
    assert_eq!(store.images().unwrap().len(), 2);
    assert_eq!(
        store.find_image("web").unwrap().unwrap().digest,
        D2,
        "a name means its newest bake"
    );
    assert_eq!(store.find_image("111111").unwrap().unwrap().digest, D1);
    assert_eq!(store.find_image(D1).unwrap().unwrap().digest, D1);
    assert_eq!(
        store
            .find_image("web@sha256:1111111")
            .unwrap()
            .unwrap()
            .digest,
        D1
    );
    assert_eq!(
        store.find_image("11").unwrap(),
        None,
        "prefixes under 6 digits are refused"
    );
    assert_eq!(store.find_image("worker").unwrap(), None);
}

#[test]
fn generations_instances_and_deploys_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).unwrap();
        let g1 = store.create_generation("web", D1, 10).unwrap();
        store
            .set_generation_status(g1, GenerationStatus::Live, 11)
            .unwrap();
        let g2 = store.create_generation("web", D2, 20).unwrap();
        let deploy = store.start_deploy("web", Some(g1), g2, 20).unwrap();
        store
            .insert_instance(&InstanceRow {
                name: "web-abc123".into(),
                role: "web".into(),
                generation: g2,
                image: D2.into(),
                status: InstanceStatus::Starting,
                pid: None,
                pid_start: None,
                port: 4000,
                log_path: "/tmp/x.log".into(),
                started_at: 21,
                ended_at: None,
                driver: "isolating".into(),
                addr: None,
            })
            .unwrap();
        store
            .set_instance_process("web-abc123", 42, 777, "127.0.0.1:4001".parse().unwrap())
            .unwrap();
        assert_eq!(store.running_deploys().unwrap()[0].id, deploy);
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.live_generation("web").unwrap().unwrap().image, D1);
    let active = store.active_instances().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(
        (active[0].pid, active[0].pid_start, active[0].port),
        (Some(42), Some(777), 4001)
    );
    assert_eq!(
        (active[0].driver.as_str(), active[0].addr.as_deref()),
        ("isolating", Some("127.0.0.1:4001"))
    );
    store
        .set_instance_status("web-abc123", InstanceStatus::Lost, 30)
        .unwrap();
    assert!(store.active_instances().unwrap().is_empty());
    let deploy = store.running_deploys().unwrap().remove(0);
    store
        .finish_deploy(deploy.id, DeployStatus::Interrupted, Some("restart"), 31)
        .unwrap();
    assert!(store.running_deploys().unwrap().is_empty());
}

#[test]
fn previous_generation_is_the_last_one_that_served() {
    let (_dir, store) = store();
    let g1 = store.create_generation("web", D1, 1).unwrap();
    store
        .set_generation_status(g1, GenerationStatus::Live, 2)
        .unwrap();
    store
        .set_generation_status(g1, GenerationStatus::Retired, 5)
        .unwrap();
    let aborted = store.create_generation("web", D2, 3).unwrap();
    store
        .set_generation_status(aborted, GenerationStatus::Aborted, 4)
        .unwrap();
    let g3 = store.create_generation("web", D2, 5).unwrap();
    store
        .set_generation_status(g3, GenerationStatus::Live, 6)
        .unwrap();
    assert_eq!(
        store
            .previous_generation("web", g3, D2)
            .unwrap()
            .unwrap()
            .id,
        g1
    );
    assert_eq!(store.previous_generation("web", g1, D2).unwrap(), None);
    // A generation that served the live image again (a drift replacement) is skipped.
    store
        .set_generation_status(g3, GenerationStatus::Retired, 7)
        .unwrap();
    let g4 = store.create_generation("web", D2, 8).unwrap();
    store
        .set_generation_status(g4, GenerationStatus::Live, 9)
        .unwrap();
    assert_eq!(
        store
            .previous_generation("web", g4, D2)
            .unwrap()
            .unwrap()
            .id,
        g1,
        "not g3, which ran the same image as g4"
    );
    assert_eq!(
        store
            .previous_generation("web", g4, D1)
            .unwrap()
            .unwrap()
            .id,
        g3
    );
}

#[test]
fn journal_is_append_only_and_filtered_by_role() {
    let (_dir, store) = store();
    store
        .journal(1, Some("web"), "deploy.started", &json!({"to": D1}))
        .unwrap();
    store
        .journal(2, Some("worker"), "deploy.started", &json!({}))
        .unwrap();
    let seq = store
        .journal(3, None, "up.started", &json!({"pid": 1}))
        .unwrap();
    let web: Vec<_> = store
        .history(Some("web"), 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(web, ["deploy.started", "up.started"]);
    assert_eq!(
        store.history(None, 2).unwrap().len(),
        2,
        "limit keeps the newest"
    );
    assert_eq!(
        store.journal_entry(seq).unwrap().unwrap().detail,
        json!({"pid": 1})
    );
    assert_eq!(store.journal_last_seq().unwrap(), seq);
    let after: Vec<_> = store
        .journal_after(seq - 2, 1)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.role))
        .collect();
    assert_eq!(after, [(seq - 1, Some("worker".to_string()))]);
    assert!(store.journal_after(seq, 10).unwrap().is_empty());
    let conn = store.conn();
    assert!(
        conn.execute("DELETE FROM journal", []).is_err(),
        "deletes are refused"
    );
    assert!(
        conn.execute("UPDATE journal SET kind = 'x'", []).is_err(),
        "updates are refused"
    );
}

#[test]
fn the_latest_verification_of_an_image_counts() {
    let (_dir, store) = store();
    assert_eq!(store.latest_verification("sha256:aa").unwrap(), None);
    let failed = VerificationRow {
        image: "sha256:aa".into(),
        name: "web".into(),
        checks: "sha256:cc".into(),
        passed: false,
        total: 3,
        failed: 1,
        failures: vec!["File: /x: exists: doesn't match".into()],
        files: vec!["/srv/checks.yaml".into()],
        at: 1,
    };
    store.record_verification(&failed).unwrap();
    assert_eq!(
        store.latest_verification("sha256:aa").unwrap(),
        Some(failed.clone())
    );
    let passed = VerificationRow {
        passed: true,
        failed: 0,
        failures: Vec::new(),
        at: 2,
        ..failed
    };
    store.record_verification(&passed).unwrap();
    assert_eq!(
        store.latest_verification("sha256:aa").unwrap(),
        Some(passed)
    );
    assert_eq!(store.latest_verification("sha256:bb").unwrap(), None);
}

#[test]
fn a_damaged_state_is_found_by_check_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).unwrap();
        for i in 0..200 {
            store.create_generation("web", D1, i).unwrap();
        }
        store.check().unwrap();
    }
    // Scribble over every page but the first (the header and the schema).
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "{} bytes", bytes.len());
    for (i, byte) in bytes.iter_mut().enumerate().skip(4096) {
        *byte = (i % 251) as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let message = match Store::open(&path).and_then(|store| store.check()) {
        Ok(()) => panic!("a scribbled state passed its check"),
        Err(error) => error.to_string(),
    };
    assert!(
        message.starts_with(&format!("state store {}", path.display())),
        "{message}"
    );
    assert!(
        message.contains("is damaged (") && message.contains("move it aside"),
        "{message}"
    );
}

#[test]
fn tags_name_one_image_and_bare_names_skip_discredited_images() {
    let (_dir, store) = store();
    store.record_image("web", D1, 10, 1).unwrap();
    store.record_image("web", D2, 20, 2).unwrap();
    store.tag_image("web", "v1", D1, 1).unwrap();
    store.tag_image("web", "v2", D2, 2).unwrap();
    assert_eq!(store.find_image("web:v1").unwrap().unwrap().digest, D1);
    assert_eq!(store.find_image("web:v2").unwrap().unwrap().digest, D2);
    assert_eq!(store.find_image("web:v3").unwrap(), None);
    assert_eq!(store.display_name("web", D2).unwrap(), "web:v2");
    // A tag moves when given to another image.
    store.tag_image("web", "v1", D2, 3).unwrap();
    assert_eq!(store.find_image("web:v1").unwrap().unwrap().digest, D2);
    // The newest bake failed verification: the bare name means the one before it.
    store
        .record_verification(&VerificationRow {
            image: D2.into(),
            name: "web".into(),
            checks: "sha256:c".into(),
            passed: false,
            total: 2,
            failed: 1,
            failures: vec!["port 8080 not listening".into()],
            files: vec![],
            at: 4,
        })
        .unwrap();
    assert_eq!(store.find_image("web").unwrap().unwrap().digest, D1);
    // The older one only ever aborted: no image answers to the bare name.
    let g = store.create_generation("web", D1, 5).unwrap();
    store
        .set_generation_status(g, GenerationStatus::Aborted, 6)
        .unwrap();
    assert_eq!(store.find_image("web").unwrap(), None);
    // By tag or digest it is still reachable, on purpose.
    assert_eq!(store.find_image("web:v2").unwrap().unwrap().digest, D2);
    assert_eq!(store.find_image(D1).unwrap().unwrap().digest, D1);
    // Removing an image removes its tags.
    store.remove_image(D2).unwrap();
    assert_eq!(store.find_image("web:v2").unwrap(), None);
}
