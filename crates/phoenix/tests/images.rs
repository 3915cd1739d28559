//! The image store from the CLI: inspect, rm, gc, drift (and its replacement of drifted
//! instances under load), and interop with Debian's skopeo and podman in both directions.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Fleet, Load, Phoenix, failures, phoenix, text, wait_for};
use serde_json::Value;

fn ok(output: Output) -> String {
    common::succeeded("the command", output)
}

/// `program`, or why the test cannot use it here (a panic when PHOENIX_REQUIRE_TOOLS is set).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn tool(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
            "PHOENIX_REQUIRE_TOOLS is set but {program} is missing"
        );
        eprintln!("skipped: {program} is not installed");
    }
    found
}

/// `podman` on runc: Debian's podman defaults to crun, which refuses hosts whose cgroups are
/// in hybrid mode (cgroup v1 controllers beside an empty v2 hierarchy).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// `podman run --rm` without network. This sandbox refuses to raise rlimits, which podman
/// does by default; lowering them is allowed.
fn podman_run(args: &[&str]) -> Output {
    podman()
        .args(["run", "--rm", "--network=none"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(args)
        .output()
        .unwrap()
}

/// A fleet file whose image is a static busybox root with a `run` step.
fn busybox_fleet(dir: &Path, tag: &str) {
    let bin = dir.join("ctx/rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    std::fs::write(
        dir.join("phoenix.toml"),
        format!(
            r#"[image.bb]
context = "ctx"
from = {{ dir = "rootfs" }}
steps = [{{ run = "mkdir -p /etc && echo baked-{tag} > /etc/motd" }}]
entrypoint = ["/bin/sh", "-c", "cat /etc/motd; echo VERSION=$VERSION"]
env = {{ VERSION = "{tag}" }}
labels = {{ "org.opencontainers.image.title" = "bb" }}
"#
        ),
    )
    .unwrap();
}

#[test]
fn exported_images_load_and_run_in_podman_and_podman_images_import() {
    if !(tool("busybox") && tool("skopeo") && tool("podman") && tool("runc")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("t{}", std::process::id());
    busybox_fleet(dir.path(), &tag);
    let baked: Value = serde_json::from_str(&ok(phoenix(
        dir.path(),
        &["--state", "s", "bake", "--json"],
    )))
    .unwrap();
    let digest = baked[0]["digest"].as_str().unwrap().to_string();
    let name = format!("phoenix-test-{tag}:v1");
    ok(phoenix(
        dir.path(),
        &[
            "--state", "s", "export", "bb", "-o", "bb.tar", "--tag", &name,
        ],
    ));
    let archive = dir.path().join("bb.tar");

    let inspect: Value = serde_json::from_str(&ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .unwrap()))
    .unwrap();
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Labels"]["org.opencontainers.image.title"], "bb");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);

    let loaded = ok(podman()
        .args(["load", "-i"])
        .arg(&archive)
        .output()
        .unwrap());
    assert!(loaded.contains(&name), "{loaded}");
    let output = ok(podman_run(&[&format!("localhost/{name}")]));
    assert_eq!(output, format!("baked-{tag}\nVERSION={tag}\n"));

    // And back: podman's own OCI archive of the image imports with the same content.
    let saved = dir.path().join("podman.tar");
    ok(podman()
        .args(["save", "--format", "oci-archive", "-o"])
        .arg(&saved)
        .arg(format!("localhost/{name}"))
        .output()
        .unwrap());
    let imported: Value = serde_json::from_str(&ok(phoenix(
        dir.path(),
        &[
            "--state",
            "other",
            "import",
            "podman.tar",
            "--name",
            "frompodman",
            "--json",
        ],
    )))
    .unwrap();
    let imported_digest = imported[0]["digest"].as_str().unwrap();
    let files = |state: &str, reference: &str| -> Value {
        serde_json::from_str::<Value>(&ok(phoenix(
            dir.path(),
            &["--state", state, "image", "inspect", reference, "--json"],
        )))
        .unwrap()["files"]
            .clone()
    };
    assert_eq!(
        files("other", imported_digest)["root"],
        files("s", &digest)["root"],
        "the same files, whoever packed the layers"
    );
    let _ = podman()
        .args(["rmi", "-f", &format!("localhost/{name}")])
        .output();
}

#[test]
fn inspect_rm_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    // Just the binary: these images are inspected and collected, never run.
    let fleet = |version| Fleet {
        libraries: false,
        ..Fleet::version(version)
    };
    fleet("v1").write_to(dir.path());
    let state = ["--state", "s"];
    let cli = |args: &[&str]| phoenix(dir.path(), &[&state[..], args].concat());
    let v1: Value = serde_json::from_str(&ok(cli(&["bake", "--json"]))).unwrap();
    // A dynamically linked binary alone on scratch would not start in a container: said.
    let warning = v1[0]["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("the entrypoint /bin/hello needs")
            && warning.contains("libc.so.6")
            && warning.contains("libraries = true"),
        "{v1}"
    );
    fleet("v2").write_to(dir.path());
    let v2: Value = serde_json::from_str(&ok(cli(&["bake", "--json"]))).unwrap();
    let (v1, v2) = (
        v1[0]["digest"].as_str().unwrap().to_string(),
        v2[0]["digest"].as_str().unwrap().to_string(),
    );

    let inspect: Value =
        serde_json::from_str(&ok(cli(&["image", "inspect", &v1[7..19], "--json"]))).unwrap();
    assert_eq!(inspect["digest"], v1.as_str());
    assert_eq!(inspect["config"]["Env"][0], "VERSION=v1");
    assert_eq!(inspect["files"]["count"], 2, "bin and bin/hello");
    assert!(
        inspect["files"]["root"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let text = ok(cli(&["image", "inspect", "hello"]));
    assert!(text.contains(&v2) && text.contains("Merkle root"), "{text}");

    // Nothing to collect while both are recorded; once v1 is removed, its manifest and config
    // go (the layer and the file manifest are v2's too).
    assert!(ok(cli(&["gc"])).starts_with("removed 0 blobs"));
    let removed = ok(cli(&["image", "rm", &v1]));
    assert!(removed.contains(&v1[7..19]), "{removed}");
    let images: Value = serde_json::from_str(&ok(cli(&["images", "--json"]))).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1);
    let gc: Value = serde_json::from_str(&ok(cli(&["gc", "--json"]))).unwrap();
    assert_eq!(gc["blobs"], 2, "{gc}");
    let gone = cli(&["image", "inspect", &v1]);
    assert!(!gone.status.success());
    assert!(text_of(&gone).contains("no image"), "{}", text_of(&gone));
    ok(cli(&["image", "inspect", &v2]));
}

fn text_of(output: &Output) -> String {
    text(&output.stderr)
}

#[test]
fn drift_is_detected_and_replaced_with_fresh_instances_under_load() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    let phoenix = Phoenix::start(&fleet);
    let status = phoenix.status();
    let instance = status["roles"][0]["generations"][0]["instances"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let image = status["roles"][0]["generations"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let clean = phoenix.cli(&["drift", &instance]);
    assert!(clean.status.success(), "{}", text(&clean.stdout));
    assert!(text(&clean.stdout).contains("0 added, 0 changed, 0 removed"));

    // A hand-made change inside the instance's root.
    let root = common::image_root(&phoenix.state(), &image);
    std::fs::set_permissions(
        root.join("bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("bin/hotfix.sh"), "echo patched").unwrap();
    let drifted = phoenix.cli(&["drift", &instance]);
    assert_eq!(drifted.status.code(), Some(1));
    let report = text(&drifted.stdout);
    assert!(
        report.contains("1 added, 0 changed, 0 removed") && report.contains("+ /bin/hotfix.sh"),
        "{report}"
    );

    let load = Load::start(phoenix.proxy_addr(), 4);
    let replaced = phoenix.cli_ok(&["drift", &instance, "--replace"]);
    assert!(replaced.contains("deployed web generation 2"), "{replaced}");
    wait_for(
        "load after the replacement",
        Duration::from_secs(10),
        || load.count() > 100,
    );
    let samples = load.stop();
    assert_eq!(failures(&samples), Vec::<String>::new());
    let status = phoenix.status();
    let live = status["roles"][0]["live_generation"].as_i64().unwrap();
    assert_eq!(live, 2);
    let fresh = status["roles"][0]["generations"][0]["instances"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(fresh, instance);
    assert!(phoenix.cli(&["drift", &fresh]).status.success());
    let kinds: Vec<String> = phoenix
        .history()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "image.drifted"), "{kinds:?}");
}

#[test]
fn a_debian_base_is_built_from_packages_once_then_cached() {
    if !(tool("mmdebstrap") && tool("podman") && tool("runc")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("phoenix.toml"),
        r#"[image.web]
from = { debian = "bookworm", packages = ["nginx-light"] }
steps = [{ run = "nginx -t && echo '<h1>baked</h1>' > /var/www/html/index.html" }]
entrypoint = ["/usr/sbin/nginx", "-g", "daemon off;"]
expose = ["80"]
"#,
    )
    .unwrap();
    let bake = || -> Value {
        let output = Command::new(common::phoenix_bin())
            .args(["--state", "s", "bake", "--json"])
            .current_dir(dir.path())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        serde_json::from_str(&ok(output)).unwrap()
    };
    let first = bake();
    assert_eq!(first[0]["new"], true);
    let digest = first[0]["digest"].as_str().unwrap().to_string();
    let inspect: Value = serde_json::from_str(&ok(phoenix(
        dir.path(),
        &["--state", "s", "image", "inspect", &digest, "--json"],
    )))
    .unwrap();
    assert!(
        inspect["files"]["count"].as_u64().unwrap() > 1000,
        "{inspect}"
    );
    assert_eq!(inspect["created"], "2023-11-14T22:13:20Z");

    // Cached: no mmdebstrap, no run step, the same digest.
    let again = bake();
    assert_eq!(again[0]["digest"], digest.as_str());
    assert!(again[0]["duration_ms"].as_u64().unwrap() < 5_000, "{again}");

    // The image is a real Debian root: podman runs its nginx.
    ok(phoenix(
        dir.path(),
        &[
            "--state",
            "s",
            "export",
            "web",
            "-o",
            "web.tar",
            "--tag",
            "phoenix-debian-test:v1",
        ],
    ));
    ok(podman()
        .args(["load", "-i"])
        .arg(dir.path().join("web.tar"))
        .output()
        .unwrap());
    let page = podman_run(&[
        "--entrypoint",
        "/bin/cat",
        "localhost/phoenix-debian-test:v1",
        "/var/www/html/index.html",
    ]);
    assert_eq!(ok(page), "<h1>baked</h1>\n");
    let _ = podman()
        .args(["rmi", "-f", "localhost/phoenix-debian-test:v1"])
        .output();
}

#[test]
fn a_role_with_drift_check_replaces_drifted_instances_by_itself() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    fleet.drift_check = Some("300ms");
    let phoenix = Phoenix::start(&fleet);
    let image = phoenix.status()["roles"][0]["generations"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let load = Load::start(phoenix.proxy_addr(), 4);
    let root = common::image_root(&phoenix.state(), &image);
    std::fs::set_permissions(
        root.join("bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::remove_file(root.join("bin/hello")).unwrap();
    wait_for(
        "the drifted role redeployed",
        Duration::from_secs(30),
        || phoenix.status()["roles"][0]["live_generation"] == 2,
    );
    assert!(
        root.join("bin/hello").is_file(),
        "the root was unpacked again"
    );
    let drifted: Vec<Value> = phoenix
        .history()
        .into_iter()
        .filter(|e| e["kind"] == "image.drifted")
        .collect();
    assert_eq!(drifted.len(), 1, "{drifted:?}");
    assert_eq!(drifted[0]["detail"]["removed"], 1);
    assert_eq!(drifted[0]["detail"]["paths"][0], "-/bin/hello");
    wait_for(
        "load after the replacement",
        Duration::from_secs(10),
        || load.count() > 100,
    );
    assert_eq!(failures(&load.stop()), Vec::<String>::new());
}

/// An OCI archive of one image whose only layer holds `entries` (name, link target) written
/// byte for byte, `..` and leading `/` included.
fn hostile_archive(path: &Path, entries: &[(&str, tar::EntryType, &str)]) {
    let mut layer = tar::Builder::new(Vec::new());
    for (name, kind, link) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_cksum();
        layer.append(&header, std::io::empty()).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let digest = |bytes: &[u8]| phoenix_image::sha256_digest(bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&layer), "size": layer.len()}],
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest.as_bytes()), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "evil:1"}}],
    })
    .to_string();
    let mut archive = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    for bytes in [&layer[..], config, manifest.as_bytes()] {
        let name = format!("blobs/sha256/{}", &digest(bytes)[7..]);
        add(&name, bytes);
    }
    archive.finish().unwrap();
}

#[test]
fn import_refuses_archives_whose_entries_leave_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    std::fs::create_dir_all(canary.join("keep")).unwrap();
    std::fs::write(canary.join("keep/file"), "precious").unwrap();
    let state = dir.path().join("deep/state");
    let cases = [
        (
            "../../../canary/.wh.keep",
            tar::EntryType::Regular,
            "",
            "climbs out of the root",
        ),
        (
            &*format!("{}/.wh.keep", canary.display()),
            tar::EntryType::Regular,
            "",
            "absolute path",
        ),
        (
            "h",
            tar::EntryType::Link,
            "../../../canary/keep/file",
            "hard link",
        ),
    ];
    for (entry, kind, link, why) in cases {
        let archive = dir.path().join("evil.tar");
        hostile_archive(&archive, &[(entry, kind, link)]);
        let output = Command::new(common::phoenix_bin())
            .arg("--state")
            .arg(&state)
            .arg("import")
            .arg(&archive)
            .output()
            .unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{entry}: {stderr}");
        assert!(
            stderr.contains("the archive is refused") && stderr.contains(why),
            "{entry}: {stderr}"
        );
        assert_eq!(
            std::fs::read(canary.join("keep/file")).unwrap(),
            b"precious"
        );
        let images = phoenix(dir.path(), &["--state", "deep/state", "images", "--json"]);
        assert_eq!(text(&images.stdout).trim(), "[]", "nothing was imported");
    }
}

#[test]
fn run_steps_are_confined_capabilities_no_new_privs_seccomp_and_no_mounts() {
    if !tool("busybox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ctx/rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    // The step reports what it holds, tries what it must not do, then fails on purpose so
    // that the report comes back in the error.
    let script = "busybox grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status; \
                  echo UIDMAP $(busybox cat /proc/self/uid_map) GIDMAP $(busybox cat /proc/self/gid_map); \
                  busybox mkdir -p /m; \
                  busybox mount -t tmpfs none /m && echo MOUNTED || echo MOUNT-REFUSED; \
                  busybox ls / | busybox tr '\\n' ' '; echo; exit 7";
    std::fs::write(
        dir.path().join("phoenix.toml"),
        format!(
            "[image.bb]\ncontext = \"ctx\"\nfrom = {{ dir = \"rootfs\" }}\nsteps = [{{ run = \"{script}\" }}]\nentrypoint = [\"/bin/sh\"]\n"
        ),
    )
    .unwrap();
    let output = phoenix(dir.path(), &["--state", "s", "bake"]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    let field = |name: &str| {
        said.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {said}"))
    };
    // Docker's default capabilities: chown, dac_override, fowner, fsetid, kill, setgid,
    // setuid, setpcap, net_bind_service, net_raw, sys_chroot, mknod, audit_write, setfcap.
    assert_eq!(field("CapBnd"), "00000000a80425fb", "{said}");
    assert_eq!(field("CapEff"), "00000000a80425fb", "{said}");
    assert_eq!(field("NoNewPrivs"), "1", "{said}");
    assert_eq!(field("Seccomp"), "2", "{said}");
    // Root inside a user namespace: uid and gid 0 are 1,800,000,000 outside.
    if is_root() {
        let maps = format!(
            "UIDMAP 0 {0} 65536 GIDMAP 0 {0} 65536",
            phoenix_fleet::ID_OFFSET
        );
        assert!(said.contains(&maps), "{maps} in {said}");
    }
    assert!(said.contains("MOUNT-REFUSED"), "{said}");
    // The step's output is kept in the log store too, under `bake`, failed bake or not.
    let kept = phoenix(dir.path(), &["--state", "s", "logs", "bake-bb", "--json"]);
    let kept = String::from_utf8_lossy(&kept.stdout).into_owned();
    let texts: Vec<String> = kept
        .lines()
        .map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(line["instance"], "bake-bb");
            line["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(texts[0].starts_with("[phoenix: step 1/"), "{texts:?}");
    assert!(texts.iter().any(|t| t == "MOUNT-REFUSED"), "{texts:?}");
    assert!(
        texts.iter().any(|t| t.starts_with("NoNewPrivs:")),
        "{texts:?}"
    );
    // Its root is the image's: no trace of the host's (no /home, /usr, /work).
    let listing = said
        .lines()
        .find(|l| l.trim_start().starts_with("bin "))
        .unwrap_or_else(|| panic!("no listing in {said}"));
    for host_dir in ["home", "usr", "work", "root"] {
        assert!(
            !listing.split_whitespace().any(|d| d == host_dir),
            "{listing}"
        );
    }
}

#[test]
fn what_a_run_step_writes_is_owned_in_the_layer_as_it_was_inside() {
    use std::os::unix::fs::MetadataExt;
    if !tool("busybox") || !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ctx/rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.path().join("ctx/rootfs/etc")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    // The step's root (uid 0 inside, 1,800,000,000 outside) writes to the image's root-owned
    // /etc, and makes files of its own and for uid 1000.
    let script = "echo made > /etc/made-by-root; busybox mkdir /srv; echo app > /srv/app; \
                  busybox chown -R 1000:1000 /srv";
    std::fs::write(
        dir.path().join("phoenix.toml"),
        format!(
            "[image.bb]\ncontext = \"ctx\"\nfrom = {{ dir = \"rootfs\" }}\nsteps = [{{ run = \"{script}\" }}]\nentrypoint = [\"/bin/sh\"]\n"
        ),
    )
    .unwrap();
    let baked = phoenix(dir.path(), &["--state", "s", "bake", "--json"]);
    assert!(baked.status.success(), "{}", text(&baked.stderr));
    let image: Value = serde_json::from_slice(&baked.stdout).unwrap();
    let digest = image["images"][0]["digest"]
        .as_str()
        .or_else(|| image[0]["digest"].as_str())
        .or_else(|| image["digest"].as_str())
        .unwrap_or_else(|| panic!("no digest in {image}"))
        .to_string();
    let store = phoenix_image::ImageStore::open(dir.path().join("s/images")).unwrap();
    let root = store.unpack(&digest).unwrap();
    let owner = |path: &str| {
        let meta = std::fs::symlink_metadata(root.join(path)).unwrap();
        (meta.uid(), meta.gid(), meta.mode() & 0o7777)
    };
    assert_eq!(owner("etc/made-by-root").0, 0);
    assert_eq!(owner("etc/made-by-root").1, 0);
    assert_eq!((owner("srv").0, owner("srv").1), (1000, 1000));
    assert_eq!((owner("srv/app").0, owner("srv/app").1), (1000, 1000));
}

#[test]
fn a_sandboxed_run_step_past_its_timeout_dies_with_its_whole_namespace() {
    if !tool("busybox") || !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ctx/rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "sleep", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    // A child in the background and one in the foreground, under the helper's user, PID and
    // mount namespaces: killing the helper must end both.
    let marker = format!("phoenix-sandbox-timeout-{}", std::process::id());
    std::fs::write(
        dir.path().join("phoenix.toml"),
        format!(
            "[image.bb]\ncontext = \"ctx\"\nfrom = {{ dir = \"rootfs\" }}\nsteps = [{{ run = \"echo started; sleep 300 & exec sleep 301 # {marker}\", timeout = \"1s\" }}]\nentrypoint = [\"/bin/sh\"]\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let output = phoenix(dir.path(), &["--state", "s", "bake"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("was killed after its timeout of 1s") && stderr.contains("started"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let survivors = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker) || c.starts_with("sleep 30"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !survivors().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(survivors().is_empty(), "{:?}", survivors());
}

/// The fleet file of `version` whose recipe is tagged `tag`.
fn tagged(version: &str, tag: &str) -> String {
    Fleet::version(version).toml().replacen(
        "[image.hello]\n",
        &format!("[image.hello]\ntag = \"{tag}\"\n"),
        1,
    )
}

#[test]
fn images_carry_tags_through_deploys_status_export_and_import() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    std::fs::write(phoenix.fleet_path(), tagged("v1", "v1")).unwrap();
    phoenix.cli_ok(&["bake"]);
    std::fs::write(phoenix.fleet_path(), tagged("v2", "v2")).unwrap();
    phoenix.cli_ok(&["deploy", "web"]);
    let status = phoenix.status();
    let v2 = status["roles"][0]["image"].as_str().unwrap().to_string();
    assert_eq!(status["roles"][0]["image_name"], "hello:v2");
    let human = phoenix.cli_ok(&["status"]);
    assert!(
        human.contains(&format!("image hello:v2 ({})", &v2[7..19])),
        "{human}"
    );
    // `images` says which tag is which and what runs live.
    let images: Vec<Value> = serde_json::from_str(&phoenix.cli_ok(&["images", "--json"])).unwrap();
    let by_tag = |tag: &str| {
        images
            .iter()
            .find(|i| i["tags"].as_array().unwrap().iter().any(|t| t == tag))
            .unwrap_or_else(|| panic!("no image tagged {tag}: {images:?}"))
            .clone()
    };
    assert_eq!(by_tag("v2")["digest"], v2.as_str());
    assert_eq!(by_tag("v2")["live"], serde_json::json!(["web"]));
    assert_eq!(by_tag("v1")["live"], serde_json::json!([]));
    // A tag names an image anywhere a reference goes.
    let back = phoenix.cli_ok(&["rollback", "web", "--to", "hello:v1"]);
    assert!(back.contains("rolling back to image hello:v1"), "{back}");
    assert_eq!(phoenix.status()["roles"][0]["image_name"], "hello:v1");
    // `bake --tag` adds one; the tag survives export and import.
    phoenix.cli_ok(&["bake", "hello", "--tag", "release-1"]);
    let archive = phoenix.dir.path().join("hello.tar");
    phoenix.cli_ok(&["export", "hello:release-1", "-o", archive.to_str().unwrap()]);
    let elsewhere = tempfile::tempdir().unwrap();
    let imported = common::phoenix(
        elsewhere.path(),
        &["--state", "s", "import", archive.to_str().unwrap()],
    );
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    let listed = common::phoenix(elsewhere.path(), &["--state", "s", "images", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "hello");
    assert_eq!(listed[0]["tags"], serde_json::json!(["release-1"]));
    assert_eq!(listed[0]["digest"], v2.as_str());
    let bad = phoenix.cli(&["bake", "hello", "--tag", "v2/x"]);
    assert!(
        text(&bad.stderr).contains("--tag: tag \"v2/x\""),
        "{}",
        text(&bad.stderr)
    );
    phoenix.interrupt();
}
