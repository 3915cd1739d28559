//! The client against real etcd members (Debian's `etcd-server`).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::test_util::{EtcdCluster, etcd_or_skip};
use super::*;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn cluster(size: usize) -> Option<EtcdCluster> {
    if !etcd_or_skip() {
        return None;
    }
    Some(EtcdCluster::start(size, LOOPBACK).expect("etcd starts"))
}

fn client(endpoints: Vec<String>) -> Etcd {
    Etcd::new(EtcdOptions {
        endpoints,
        tls: None,
        credentials: None,
        timeout: Duration::from_secs(2),
    })
    .unwrap()
}

#[tokio::test]
async fn keys_values_transactions_and_prefixes() {
    let Some(cluster) = cluster(1) else { return };
    let etcd = client(cluster.endpoints());
    assert_eq!(etcd.get("/t/a").await.unwrap(), None);
    let first = etcd.put("/t/a", "1", 0).await.unwrap();
    etcd.put("/t/b", b"\xff\x00binary", 0).await.unwrap();
    etcd.put("/u/c", "elsewhere", 0).await.unwrap();
    let a = etcd.get("/t/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"1"[..], first, first)
    );
    let (_, under) = etcd.get_prefix("/t/").await.unwrap();
    let keys: Vec<&str> = under.iter().map(KeyValue::key_str).collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);
    assert_eq!(under[1].value, b"\xff\x00binary");

    // Compare-and-swap: the first writer wins, the second sees the winner's value.
    let create = |v: &'static str| {
        let etcd = etcd.clone();
        async move {
            etcd.txn(
                &[Compare::absent("/t/once")],
                &[Op::put("/t/once", v)],
                &[Op::get("/t/once")],
            )
            .await
            .unwrap()
        }
    };
    let won = create("x").await;
    let lost = create("y").await;
    assert!(won.succeeded && !lost.succeeded);
    assert_eq!(lost.reads[0][0].value, b"x");
    let stale = etcd
        .txn(
            &[Compare::mod_revision("/t/a", first - 1)],
            &[Op::put("/t/a", "2")],
            &[],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(etcd.get("/t/a").await.unwrap().unwrap().value, b"1");

    let last = etcd.last_under("/t/").await.unwrap().unwrap();
    assert_eq!(last.key_str(), "/t/once");
    assert_eq!(etcd.last_under("/nothing/").await.unwrap(), None);

    etcd.delete("/t/", true).await.unwrap();
    assert_eq!(etcd.get_prefix("/t/").await.unwrap().1, vec![]);
    assert_eq!(etcd.get("/u/c").await.unwrap().unwrap().value, b"elsewhere");
}

#[tokio::test]
async fn leased_keys_vanish_with_their_lease_and_watches_see_it() {
    let Some(cluster) = cluster(1) else { return };
    let etcd = client(cluster.endpoints());
    let lease = etcd.grant(Duration::from_secs(30)).await.unwrap();
    let start = etcd.put("/w/held", "by lease", lease).await.unwrap();
    assert_eq!(etcd.get("/w/held").await.unwrap().unwrap().lease, lease);
    let left = etcd.keep_alive(lease).await.unwrap();
    assert!((29..=30).contains(&left), "{left}");

    let mut watch = etcd.watch("/w/", true, start).await.unwrap();
    etcd.put("/w/other", "v", 0).await.unwrap();
    etcd.revoke(lease).await.unwrap();
    assert_eq!(etcd.keep_alive(lease).await.unwrap(), 0);
    assert_eq!(etcd.get("/w/held").await.unwrap(), None);

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        for event in batch.events {
            seen.push((event.kv.key_str().to_string(), event.is_delete()));
        }
    }
    assert_eq!(
        seen,
        [
            ("/w/held".into(), false),
            ("/w/other".into(), false),
            ("/w/held".into(), true)
        ]
    );
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_deposed_one_cannot_write() {
    let Some(cluster) = cluster(1) else { return };
    let etcd = client(cluster.endpoints());
    let ttl = Duration::from_secs(2);
    let a = Candidate::new(etcd.clone(), "/e/leader", "host-a", ttl);
    let b = Candidate::new(etcd.clone(), "/e/leader", "host-b", ttl);
    let a_leads = a.campaign().await.unwrap();
    let b_campaign = tokio::spawn(async move { b.campaign().await });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !b_campaign.is_finished(),
        "b must wait while a keeps its lease alive"
    );
    let leader = a.leader().await.unwrap().unwrap();
    assert_eq!(
        (leader.value.as_slice(), leader.lease),
        (&b"host-a"[..], a_leads.lease())
    );
    assert!(
        a_leads
            .txn(&[], &[Op::put("/e/state", "by a")])
            .await
            .unwrap()
            .succeeded
    );

    // a hangs: its renewals stop, etcd expires the lease and b takes over.
    let hung = Instant::now();
    a_leads.hang();
    let b_leads = tokio::time::timeout(Duration::from_secs(10), b_campaign)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let took = hung.elapsed();
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    assert!(b_leads.term() > a_leads.term());

    // a wakes up and writes: the fence refuses, naming the new leader, and nothing changed.
    let error = a_leads
        .txn(&[], &[Op::put("/e/state", "by a, late")])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, EtcdError::Deposed { holder: Some(h), .. } if h == "host-b"),
        "{error}"
    );
    assert_eq!(etcd.get("/e/state").await.unwrap().unwrap().value, b"by a");

    // A comparison of the caller's that fails is not a deposition.
    let no = b_leads
        .txn(&[Compare::absent("/e/state")], &[Op::put("/e/state", "b")])
        .await
        .unwrap();
    assert!(!no.succeeded);
    // Resigning hands over at once.
    let c = Candidate::new(etcd.clone(), "/e/leader", "host-c", ttl);
    let c_campaign = tokio::spawn(async move { c.campaign().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resigned = Instant::now();
    b_leads.resign().await.unwrap();
    let c_leads = tokio::time::timeout(Duration::from_secs(5), c_campaign)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(resigned.elapsed() < ttl, "{:?}", resigned.elapsed());
    assert!(!c_leads.is_lost());
}

#[tokio::test]
async fn members_fail_over_and_a_lost_quorum_says_so() {
    let Some(mut cluster) = cluster(3) else {
        return;
    };
    let etcd = client(cluster.endpoints());
    etcd.put("/f/k", "before", 0).await.unwrap();
    // The member in use dies: the next one answers.
    cluster.kill(0);
    let mut written = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !written && Instant::now() < deadline {
        written = etcd.put("/f/k", "after one died", 0).await.is_ok();
    }
    assert!(written, "two of three members keep a quorum");
    assert_eq!(
        etcd.get("/f/k").await.unwrap().unwrap().value,
        b"after one died"
    );

    // Two of three gone: a write fails in bounded time and says why.
    cluster.kill(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let error = etcd.put("/f/k", "no quorum", 0).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let text = error.to_string();
    assert!(matches!(error, EtcdError::Unavailable { .. }), "{text}");
    assert!(text.contains("quorum"), "{text}");

    // The quorum comes back: so do writes.
    cluster.restart(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = false;
    while !back && Instant::now() < deadline {
        back = etcd.put("/f/k", "healed", 0).await.is_ok();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back);
}

#[tokio::test]
async fn authentication_with_a_user_and_a_bad_password_is_named() {
    let Some(cluster) = cluster(1) else { return };
    let admin = client(cluster.endpoints());
    for (path, body) in [
        (
            "auth/user/add",
            serde_json::json!({"name": "root", "password": "s3cret"}),
        ),
        (
            "auth/user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("auth/enable", serde_json::json!({})),
    ] {
        let _: serde_json::Value = admin.call(path, body).await.unwrap();
    }
    let with = |password: &str| {
        Etcd::new(EtcdOptions {
            endpoints: cluster.endpoints(),
            tls: None,
            credentials: Some(("root".into(), password.into())),
            timeout: Duration::from_secs(2),
        })
        .unwrap()
    };
    let anonymous = admin.put("/a/k", "v", 0).await.unwrap_err().to_string();
    assert!(
        anonymous.contains("user name is empty") || anonymous.contains("auth"),
        "{anonymous}"
    );
    let wrong = with("guess")
        .put("/a/k", "v", 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        wrong.contains("authentication as \"root\" failed"),
        "{wrong}"
    );
    let right = with("s3cret");
    right.put("/a/k", "v", 0).await.unwrap();
    assert_eq!(right.get("/a/k").await.unwrap().unwrap().value, b"v");
}

#[test]
fn https_endpoints_need_tls_settings() {
    let error = Etcd::new(EtcdOptions {
        endpoints: vec!["https://127.0.0.1:2379".into()],
        tls: None,
        credentials: None,
        timeout: Duration::from_secs(1),
    })
    .unwrap_err();
    assert!(error.to_string().contains("no TLS settings"), "{error}");
}

/// A peer that is not etcd: answers every connection with `answer`, then (if `flood`) zeros
/// without end.
async fn hostile_peer(answer: &'static [u8], flood: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                let zeros = vec![0u8; 1 << 20];
                while flood && stream.write_all(&zeros).await.is_ok() {}
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hostile_endpoint_gets_a_bounded_error_not_our_memory() {
    let huge = hostile_peer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n",
        true,
    )
    .await;
    let error = client(vec![huge]).get("/k").await.unwrap_err().to_string();
    assert!(
        error.contains("reading the answer") || error.contains("no whole answer"),
        "{error}"
    );

    let garbage = hostile_peer(b"SSH-2.0-OpenSSH_9.2\r\n", false).await;
    let error = client(vec![garbage])
        .get("/k")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("no etcd endpoint could be used"),
        "{error}"
    );

    let not_json = hostile_peer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false).await;
    let error = client(vec![not_json])
        .get("/k")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("answered something that is not etcd's"),
        "{error}"
    );
}
