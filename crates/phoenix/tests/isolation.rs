//! Instances are containers: each sees only its own root, runs as its user (an unprivileged
//! host uid), cannot see other instances or the state, reaches other roles by name through the
//! proxy, gets its secrets only as files, and is OOM-killed at its memory limit and replaced.
//! Each test runs `phoenix up` in a network namespace of its own, with its bridge.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Phoenix, hello_bin, text, wait_for};
use phoenix_driver::test_util::files_holding;
use serde_json::Value;

/// Root only: containers, cgroups and bridges need it (CI runs as root).
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: containers need root");
    }
    root
}

const TOKEN: &str = "tok-8f2c1e9d-isolation";

/// A busybox root with the hello app (and its libraries), an os-release and a user `app`; two
/// roles, `web` (with a secret, an environment and limits) and `api`.
fn fleet_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let rootfs = ctx.join("rootfs");
    for sub in ["bin", "etc", "tmp", "srv"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "id", "ps", "ls", "env", "hostname", "stat", "nc", "grep", "wc", "printf",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/os-release"),
        "PRETTY_NAME=\"Phoenix isolation image\"\n",
    )
    .unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::copy(hello_bin(), ctx.join("hello")).unwrap();
    std::fs::write(dir.path().join("token.txt"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("phoenix.toml"),
        r#"
[image.app]
context = "ctx"
from = { dir = "rootfs" }
copy = [{ src = "hello", dst = "/bin/hello", libraries = true }]
entrypoint = ["/bin/hello"]
user = "app"
env = { VERSION = "v1" }

[secret.token]
file = "token.txt"

[role.web]
image = "app"
instances = 2
listen = "127.0.0.1:0"
stop_timeout = "2s"
secrets = ["token"]
resources = { memory = "96MiB", pids = 256, cpus = 1.0 }

[role.web.env]
GREETING = "from-the-role"

[role.web.health]
interval = "100ms"
healthy_threshold = 2
unhealthy_threshold = 2

[role.api]
image = "app"
instances = 1
listen = "127.0.0.1:0"
stop_timeout = "2s"

[role.api.health]
interval = "100ms"
"#,
    )
    .unwrap();
    dir
}

fn start() -> Phoenix {
    let mut phoenix = Phoenix::launch(fleet_dir(), &[], Some(common::Netns::new()));
    phoenix.wait_role("web", 2);
    phoenix.wait_role("api", 1);
    phoenix
}

/// The role's live instances in `phoenix status --json`.
fn instances(phoenix: &Phoenix, role: &str) -> Vec<Value> {
    let status = phoenix.status();
    let role = status["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == role)
        .unwrap()
        .clone();
    role["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == role["live_generation"])
        .map(|g| g["instances"].as_array().unwrap().clone())
        .unwrap_or_default()
}

fn listen(phoenix: &Phoenix, role: &str) -> String {
    phoenix.status()["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == role)
        .unwrap()["listen"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `phoenix exec INSTANCE -- sh -c SCRIPT`.
fn exec(phoenix: &Phoenix, instance: &str, script: &str) -> Output {
    phoenix.cli(&["exec", instance, "--", "/bin/sh", "-c", script])
}

fn exec_ok(phoenix: &Phoenix, instance: &str, script: &str) -> String {
    common::succeeded(&format!("exec {script}"), exec(phoenix, instance, script))
}

#[test]
fn an_instance_sees_only_its_own_root_user_and_processes() {
    if !root() {
        return;
    }
    let phoenix = start();
    let web = instances(&phoenix, "web");
    let (first, second) = (
        web[0]["name"].as_str().unwrap().to_string(),
        web[1]["name"].as_str().unwrap().to_string(),
    );
    // Its own root: the image's /etc/os-release, not the host's; not the state directory.
    let os = exec_ok(&phoenix, &first, "cat /etc/os-release");
    assert_eq!(os, "PRETTY_NAME=\"Phoenix isolation image\"\n");
    let state = phoenix.state().canonicalize().unwrap();
    let looked = exec(&phoenix, &first, &format!("ls {}", state.display()));
    assert!(!looked.status.success(), "the state directory is not there");
    // Its user inside, an unprivileged uid outside.
    assert_eq!(exec_ok(&phoenix, &first, "id -u; id -g"), "1000\n1000\n");
    let pid = web[0]["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let host_uid = phoenix_fleet::ID_OFFSET + 1000;
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == host_uid.to_string()),
        "runs as host uid {host_uid}: {uid_line}"
    );
    // Its hostname is its name; its processes are its own (hello as PID 1, and the probe).
    assert_eq!(exec_ok(&phoenix, &first, "hostname"), format!("{first}\n"));
    let ps = exec_ok(&phoenix, &first, "ps -o pid,comm");
    assert!(ps.contains("    1 hello") || ps.contains("1 hello"), "{ps}");
    let other_pid = web[1]["pid"].as_u64().unwrap();
    assert_eq!(
        ps.lines().filter(|l| l.contains("hello")).count(),
        1,
        "not the other instance's ({second}, host pid {other_pid}): {ps}"
    );
    // Its environment: the image's and the role's, given at start.
    let env = exec_ok(&phoenix, &first, "env");
    assert!(
        env.contains("GREETING=from-the-role") && env.contains("VERSION=v1"),
        "{env}"
    );
    assert!(!env.contains(TOKEN), "{env}");
    // The role's env is not in the image.
    let image = phoenix.status()["roles"][1]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let inspect = phoenix.cli_ok(&["image", "inspect", &image, "--json"]);
    assert!(!inspect.contains("GREETING"), "{inspect}");
    // Another role, by name (in its /etc/hosts: busybox's static tools cannot use the C
    // library's resolver) through the proxy at the bridge's address.
    let api_port = listen(&phoenix, "api")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let hosts = exec_ok(&phoenix, &first, "cat /etc/hosts");
    let gateway = hosts
        .lines()
        .find_map(|l| l.strip_suffix("\tapi"))
        .unwrap_or_else(|| panic!("no `api` in /etc/hosts:\n{hosts}"))
        .to_string();
    assert!(hosts.contains(&format!("\t{first}\n")), "{hosts}");
    let get = |port: &str, path: &str| {
        format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {gateway} {port}")
    };
    let answer = exec_ok(&phoenix, &first, &get(&api_port, "/"));
    assert!(answer.contains("\r\n\r\nhello from api-"), "{answer}");
    // Not the API of `phoenix up`: its socket is in the state directory, out of sight.
    let socket = phoenix.state().join("api.sock");
    assert!(socket.exists());
    let hidden = exec(&phoenix, &first, &format!("test -e {}", socket.display()));
    assert_eq!(hidden.status.code(), Some(1), "{}", text(&hidden.stdout));
    // The exit code of `phoenix exec` is the command's.
    assert_eq!(exec(&phoenix, &first, "exit 42").status.code(), Some(42));
    let gone = phoenix.cli(&["exec", "web-000000", "--", "true"]);
    assert!(text(&gone.stderr).contains("no instance \"web-000000\""));
}

#[test]
fn secrets_reach_instances_only_as_files_and_roll_out_with_a_deploy() {
    if !root() {
        return;
    }
    let phoenix = start();
    let web = instances(&phoenix, "web");
    let name = web[0]["name"].as_str().unwrap().to_string();
    assert_eq!(exec_ok(&phoenix, &name, "cat /run/secrets/token"), TOKEN);
    assert_eq!(
        exec_ok(&phoenix, &name, "stat -c '%a %u %g' /run/secrets/token"),
        "400 1000 1000\n"
    );
    assert_eq!(
        exec_ok(&phoenix, &name, "stat -f -c %T /run/secrets"),
        "tmpfs\n"
    );
    // Nowhere else: not a file of the state directory (state.db, logs, bundles, images), not
    // phoenix up's output, not an answer of the API or the CLI.
    let run = phoenix_driver::run_dir_of(&phoenix.state());
    let mut leaks = files_holding(phoenix.dir.path(), TOKEN.as_bytes());
    leaks.extend(files_holding(&run, TOKEN.as_bytes()));
    leaks.retain(|path| !path.ends_with("token.txt"));
    assert_eq!(leaks, Vec::<PathBuf>::new());
    for answer in [
        phoenix.cli_ok(&["status", "--json"]),
        phoenix.cli_ok(&["history", "--json", "--limit", "100000"]),
        phoenix.api_get("/metrics"),
        phoenix.api_get("/v1/status"),
    ] {
        assert!(!answer.contains(TOKEN), "{answer}");
    }
    // A new value goes out with the next deploy, blue-green.
    std::fs::write(phoenix.dir.path().join("token.txt"), "rotated-value").unwrap();
    let deployed = phoenix.cli_ok(&["deploy", "web"]);
    assert!(deployed.contains("deployed web generation"), "{deployed}");
    for instance in instances(&phoenix, "web") {
        let name = instance["name"].as_str().unwrap();
        assert_eq!(
            exec_ok(&phoenix, name, "cat /run/secrets/token"),
            "rotated-value"
        );
    }
    let mut leaks = files_holding(&phoenix.state(), b"rotated-value");
    leaks.extend(files_holding(&run, b"rotated-value"));
    assert_eq!(leaks, Vec::<PathBuf>::new());
}

#[test]
fn over_its_memory_limit_an_instance_is_oom_killed_journaled_and_replaced() {
    if !root() {
        return;
    }
    let phoenix = start();
    let web = instances(&phoenix, "web");
    let victim = web[0]["name"].as_str().unwrap().to_string();
    let addr: std::net::SocketAddr = web[0]["address"].as_str().unwrap().parse().unwrap();
    // 200 MiB under a 96 MiB limit: the kernel kills it; the request gets no answer.
    let answer = phoenix.get(addr, "/alloc/200");
    assert!(!answer.contains("holding 200"), "{answer}");
    wait_for("the OOM kill journaled", Duration::from_secs(20), || {
        phoenix
            .history()
            .iter()
            .any(|e| e["kind"] == "instance.oom" && e["detail"]["instance"] == victim.as_str())
    });
    let oom = phoenix
        .history()
        .into_iter()
        .find(|e| e["kind"] == "instance.oom")
        .unwrap();
    assert_eq!(oom["detail"]["memory_limit"], 96 << 20, "{oom}");
    assert!(
        oom["detail"]["exit"]
            .as_str()
            .unwrap()
            .contains("out of memory"),
        "{oom}"
    );
    wait_for("a replacement", Duration::from_secs(30), || {
        let live = instances(&phoenix, "web");
        live.len() == 2
            && live.iter().all(|i| i["status"] == "healthy")
            && live.iter().all(|i| i["name"] != victim.as_str())
    });
    // Under the limit, memory is taken and kept.
    let survivor: std::net::SocketAddr = instances(&phoenix, "web")[0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        phoenix
            .get(survivor, "/alloc/32")
            .contains("holding 32 MiB")
    );
}

/// A Debian root with nginx from packages (mmdebstrap), serving its instance's hostname and
/// a version on port 8080.
fn nginx_fleet(dir: &Path, version: &str) {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("site.conf"),
        format!(
            "server {{\n  listen 8080;\n  location = /healthz {{ return 200 \"ok\\n\"; }}\n  \
             location / {{ return 200 \"nginx $hostname version {version}\\n\"; }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("phoenix.toml"),
        r#"
[image.nginx]
context = "ctx"
from = { debian = "bookworm", packages = ["nginx-light"] }
copy = [{ src = "site.conf", dst = "/etc/nginx/sites-enabled/default" }]
entrypoint = ["/usr/sbin/nginx", "-g", "daemon off;"]
expose = ["8080"]

[role.web]
image = "nginx"
instances = 2
listen = "127.0.0.1:0"
stop_timeout = "3s"

[role.web.health]
interval = "100ms"

[role.web.deploy]
healthy_timeout = "60s"
drain = "5s"
"#,
    )
    .unwrap();
}

#[test]
fn a_debian_nginx_image_deploys_blue_green_under_load() {
    if !root() {
        return;
    }
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v mmdebstrap"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
            "PHOENIX_REQUIRE_TOOLS is set but mmdebstrap is missing"
        );
        eprintln!("skipped: mmdebstrap is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    nginx_fleet(dir.path(), "v1");
    // Baked here, where the Debian archive can be reached; `phoenix up` then runs in a network
    // namespace of its own and finds the base in its cache, for v1 and for v2.
    common::succeeded(
        "phoenix bake",
        common::phoenix(dir.path(), &["--state", "state", "bake"]),
    );
    let mut phoenix = Phoenix::launch(dir, &[], Some(common::Netns::new()));
    phoenix.wait_role("web", 2);
    let live = instances(&phoenix, "web");
    // Its own Debian, its own address on the bridge.
    let name = live[0]["name"].as_str().unwrap();
    let os = exec_ok(&phoenix, name, "cat /etc/os-release");
    assert!(os.contains("Debian GNU/Linux 12 (bookworm)"), "{os}");
    let addr = live[0]["address"].as_str().unwrap();
    assert!(
        addr.starts_with("10.89.") && addr.ends_with(":8080"),
        "{addr}"
    );

    let load = phoenix.load(phoenix.proxy_addr(), 4);
    wait_for("traffic on v1", Duration::from_secs(10), || {
        load.count() > 50
    });
    nginx_fleet(phoenix.dir.path(), "v2");
    let deployed = phoenix.cli_ok(&["deploy", "web"]);
    assert!(deployed.contains("deployed web generation 2"), "{deployed}");
    let after_switch = load.count();
    wait_for("traffic on v2", Duration::from_secs(10), || {
        load.count() > after_switch + 100
    });
    let samples = load.stop();
    assert_eq!(common::failures(&samples), Vec::<String>::new());
    let last = samples.last().unwrap().result.clone().unwrap();
    assert_eq!(last, "v2");
    let versions: std::collections::BTreeSet<String> = samples
        .iter()
        .filter_map(|s| s.result.clone().ok())
        .collect();
    assert_eq!(versions, ["v1".to_string(), "v2".to_string()].into());
    // The old generation's containers are gone.
    assert!(
        live.iter()
            .all(|i| !Path::new(&format!("/proc/{}", i["pid"])).exists()),
        "the v1 instances stopped"
    );
}
