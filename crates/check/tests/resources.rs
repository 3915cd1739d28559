//! Every resource type, passing and failing, against real files, sockets, processes and an HTTP
//! server started here; malformed files; include loops.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use phoenix_check::{
    Format, FormatOptions, Report, RunOptions, Status, SuiteError, Target, TemplateData, load,
    render, run,
};
use serde_json::json;

struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        Scene {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn run(&self, goss: &str, target: &Target) -> Report {
        let file = self.write("goss.yaml", goss);
        let suite = load(&file, &TemplateData::default()).unwrap_or_else(|e| panic!("{e}"));
        run(&suite, target, &RunOptions::default())
    }
}

fn status(report: &Report, resource: &str, id: &str, property: &str) -> Status {
    let found = report
        .outcomes
        .iter()
        .find(|o| o.resource_type == resource && o.resource_id == id && o.property == property);
    found
        .unwrap_or_else(|| panic!("no outcome {resource} {id} {property} in {report:#?}"))
        .result
}

/// Asserts each (type, id, property) has the status, and prints the report when not.
fn expect(report: &Report, wanted: &[(&str, &str, &str, Status)]) {
    for (resource, id, property, want) in wanted {
        let got = status(report, resource, id, property);
        assert_eq!(
            got,
            *want,
            "{resource} {id} {property}\n{}",
            render(
                report,
                Format::Documentation,
                &FormatOptions::default(),
                false
            )
        );
    }
}

use Status::{Fail, Pass, Skip};

#[test]
fn files() {
    let scene = Scene::new();
    let file = scene.write("data/app.conf", "listen = 8080\nmode = fast\n");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&file, scene.path("data/link")).unwrap();
    let (f, link, dir) = (
        file.display(),
        scene.path("data/link").display().to_string(),
        scene.path("data").display().to_string(),
    );
    let uid = unsafe { libc::geteuid() };
    let sha = format!("{:x}", sha256(std::fs::read(&file).unwrap()));
    let goss = format!(
        r#"
file:
  {f}:
    exists: true
    mode: "0640"
    size: 26
    uid: {uid}
    filetype: file
    contents: [listen, "/^mode = (fast|slow)$/", "!debug"]
    sha256: {sha}
    md5: {{have-len: 32}}
  {link}:
    filetype: symlink
    linked-to: {f}
    contents: {{contain-substring: "mode = fast"}}
  {dir}:
    filetype: directory
    mode: {{match-regexp: "^07"}}
  /nonexistent/phoenix-file:
    exists: false
    mode: "0644"
  /nonexistent/phoenix-other:
    exists: true
    mode: "0644"
"#
    );
    let report = scene.run(&goss, &Target::host());
    let f = f.to_string();
    expect(
        &report,
        &[
            ("File", &f, "exists", Pass),
            ("File", &f, "mode", Pass),
            ("File", &f, "size", Pass),
            ("File", &f, "uid", Pass),
            ("File", &f, "filetype", Pass),
            ("File", &f, "contents", Pass),
            ("File", &f, "sha256", Pass),
            ("File", &f, "md5", Pass),
            ("File", &link, "filetype", Pass),
            ("File", &link, "linked-to", Pass),
            ("File", &link, "contents", Pass),
            ("File", &dir, "filetype", Pass),
            ("File", &dir, "mode", Pass),
            // Attributes after a failed `exists`, or one that found nothing, are skipped.
            ("File", "/nonexistent/phoenix-file", "exists", Pass),
            ("File", "/nonexistent/phoenix-file", "mode", Skip),
            ("File", "/nonexistent/phoenix-other", "exists", Fail),
            ("File", "/nonexistent/phoenix-other", "mode", Skip),
        ],
    );
    let changed = scene.run(
        &format!(
            "file:\n  {f}:\n    mode: \"0644\"\n    contents: [debug]\n    sha256: {}\n",
            "0".repeat(64)
        ),
        &Target::host(),
    );
    expect(
        &changed,
        &[
            ("File", &f, "mode", Fail),
            ("File", &f, "contents", Fail),
            ("File", &f, "sha256", Fail),
        ],
    );
}

fn sha256(bytes: Vec<u8>) -> impl std::fmt::LowerHex {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
}

/// A root with the tables an image carries: users, groups, dpkg's database, init scripts.
fn image_root(scene: &Scene) -> Target {
    scene.write(
        "root/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1001:1001:Alice:/home/alice:/bin/bash\n",
    );
    scene.write(
        "root/etc/group",
        "root:x:0:\nalice:x:1001:\ndocker:x:999:alice,bob\n",
    );
    scene.write(
        "root/var/lib/dpkg/status",
        "Package: nginx\nStatus: install ok installed\nVersion: 1.22.1-9\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n",
    );
    scene.write("root/etc/init.d/web", "#!/bin/sh\nexit 0\n");
    std::fs::create_dir_all(scene.path("root/etc/rc2.d")).unwrap();
    std::os::unix::fs::symlink("../init.d/web", scene.path("root/etc/rc2.d/S01web")).unwrap();
    scene.write("root/srv/www/index.html", "<h1>hi</h1>\n");
    std::os::unix::fs::symlink("/srv/www", scene.path("root/var-www")).unwrap();
    Target {
        root: scene.path("root"),
        env: None,
        workdir: None,
    }
}

#[test]
fn users_groups_packages_and_services_of_an_image_root() {
    let scene = Scene::new();
    let target = image_root(&scene);
    let goss = r#"
user:
  alice:
    exists: true
    uid: 1001
    gid: {lt: 2000}
    groups: {consist-of: [alice, docker]}
    home: /home/alice
    shell: {have-suffix: bash}
  bob:
    exists: true
  root:
    groups: [docker]
group:
  docker:
    exists: true
    gid: 999
  wheel:
    exists: false
  nogroup:
    exists: true
package:
  nginx:
    installed: true
    versions: {contain-element: {have-prefix: "1.22"}}
  gone:
    installed: false
  apache2:
    installed: true
service:
  web:
    enabled: true
    running: true
  db:
    enabled: true
file:
  /var-www/index.html:
    contents: ["<h1>"]
  /etc/passwd:
    contents: [alice]
"#;
    let report = scene.run(goss, &target);
    expect(
        &report,
        &[
            ("User", "alice", "exists", Pass),
            ("User", "alice", "uid", Pass),
            ("User", "alice", "gid", Pass),
            ("User", "alice", "groups", Pass),
            ("User", "alice", "home", Pass),
            ("User", "alice", "shell", Pass),
            ("User", "bob", "exists", Fail),
            ("User", "root", "groups", Fail),
            ("Group", "docker", "exists", Pass),
            ("Group", "docker", "gid", Pass),
            ("Group", "wheel", "exists", Pass),
            ("Group", "nogroup", "exists", Fail),
            ("Package", "nginx", "installed", Pass),
            ("Package", "nginx", "versions", Pass),
            ("Package", "gone", "installed", Pass),
            ("Package", "apache2", "installed", Fail),
            ("Service", "web", "enabled", Pass),
            // The running state of an image's service is not knowable from its files.
            ("Service", "web", "running", Fail),
            ("Service", "db", "enabled", Fail),
            // Absolute symlinks resolve inside the root, as they will in the instance.
            ("File", "/var-www/index.html", "contents", Pass),
            ("File", "/etc/passwd", "contents", Pass),
        ],
    );
}

#[test]
fn ports_addresses_and_interfaces() {
    let scene = Scene::new();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (port, udp_port) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let goss = format!(
        r#"
port:
  tcp:{port}:
    listening: true
    ip: [127.0.0.1]
  udp:{udp_port}:
    listening: true
  tcp:{closed}:
    listening: true
  tcp6:{port}:
    listening: false
addr:
  tcp://127.0.0.1:{port}:
    reachable: true
  tcp://127.0.0.1:{closed}:
    reachable: true
    timeout: 300
interface:
  lo:
    exists: true
    addrs: {{contain-element: 127.0.0.1/8}}
    mtu: {{gt: 0}}
  phoenix-nope0:
    exists: true
dns:
  localhost:
    resolvable: true
    addrs: {{contain-element: 127.0.0.1}}
  A:localhost:
    resolveable: true
  nonexistent.invalid:
    resolvable: true
    timeout: 2000
"#
    );
    let report = scene.run(&goss, &Target::host());
    let (p, u, c) = (
        format!("tcp:{port}"),
        format!("udp:{udp_port}"),
        format!("tcp:{closed}"),
    );
    let (open_addr, closed_addr) = (
        format!("tcp://127.0.0.1:{port}"),
        format!("tcp://127.0.0.1:{closed}"),
    );
    expect(
        &report,
        &[
            ("Port", &p, "listening", Pass),
            ("Port", &p, "ip", Pass),
            ("Port", &u, "listening", Pass),
            ("Port", &c, "listening", Fail),
            ("Port", &format!("tcp6:{port}"), "listening", Pass),
            ("Addr", &open_addr, "reachable", Pass),
            ("Addr", &closed_addr, "reachable", Fail),
            ("Interface", "lo", "exists", Pass),
            ("Interface", "lo", "addrs", Pass),
            ("Interface", "lo", "mtu", Pass),
            ("Interface", "phoenix-nope0", "exists", Fail),
            ("DNS", "localhost", "resolvable", Pass),
            ("DNS", "localhost", "addrs", Pass),
            // goss's old spelling is reported under the new one.
            ("DNS", "A:localhost", "resolvable", Pass),
            ("DNS", "nonexistent.invalid", "resolvable", Fail),
        ],
    );
    drop((tcp, udp));
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn processes_commands_kernel_params_mounts_and_matching() {
    let scene = Scene::new();
    let sleeper = scene.path("phxsleeper");
    std::fs::copy("/bin/sleep", &sleeper).unwrap();
    let _child = Reaped(Command::new(&sleeper).arg("30").spawn().unwrap());
    let goss = r#"
process:
  phxsleeper:
    running: true
  phoenix-never-runs:
    running: true
command:
  greet:
    exec: "echo hello; echo oops >&2; exit 3"
    exit-status: 3
    stdout: [hello]
    stderr: ["/o+ps/"]
  whole output:
    exec: "printf 'a\nb\n'"
    stdout: "a\nb"
    exit-status: {lt: 1}
  wrong:
    exec: "echo hello"
    exit-status: 1
    stdout: ["!hello"]
  slow:
    exec: "sleep 5"
    exit-status: 0
    timeout: 200
kernel-param:
  kernel.ostype:
    value: Linux
  kernel.pid_max:
    value: {gt: 100}
  kernel.hostname:
    value: phoenix-not-this-host
mount:
  /proc:
    exists: true
    filesystem: proc
    opts: {contain-element: {match-regexp: "^r[wo]$"}}
  /:
    usage: {le: 100}
  /nonexistent-mount:
    exists: true
matching:
  three numbers:
    content: [1, 2, 3]
    matches: {and: [{have-len: 3}, {contain-element: 2}, {not: {contain-element: 4}}]}
  text:
    content: "phoenix"
    matches: {or: [{have-prefix: x}, {have-suffix: y}]}
"#;
    let started = std::time::Instant::now();
    let report = scene.run(goss, &Target::host());
    expect(
        &report,
        &[
            ("Process", "phxsleeper", "running", Pass),
            ("Process", "phoenix-never-runs", "running", Fail),
            ("Command", "greet", "exit-status", Pass),
            ("Command", "greet", "stdout", Pass),
            ("Command", "greet", "stderr", Pass),
            ("Command", "whole output", "stdout", Pass),
            ("Command", "whole output", "exit-status", Pass),
            ("Command", "wrong", "exit-status", Fail),
            ("Command", "wrong", "stdout", Fail),
            ("Command", "slow", "exit-status", Fail),
            ("KernelParam", "kernel.ostype", "value", Pass),
            ("KernelParam", "kernel.pid_max", "value", Pass),
            ("KernelParam", "kernel.hostname", "value", Fail),
            ("Mount", "/proc", "exists", Pass),
            ("Mount", "/proc", "filesystem", Pass),
            ("Mount", "/proc", "opts", Pass),
            ("Mount", "/", "usage", Pass),
            ("Mount", "/nonexistent-mount", "exists", Fail),
            ("Matching", "three numbers", "matches", Pass),
            ("Matching", "text", "matches", Fail),
        ],
    );
    let slow = report
        .outcomes
        .iter()
        .find(|o| o.resource_id == "slow")
        .unwrap();
    assert!(slow.error.contains("timed out after 200 ms"), "{slow:?}");
    // The 5 s command was killed, not waited for.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// A small HTTP/1.1 server: `/ok`, `/redirect`, `/chunked`, `/auth`, anything else 500.
fn http_server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(7) {
            let mut stream = stream.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let target = head.split(' ').nth(1).unwrap_or("");
            let path = target.split('?').next().unwrap_or("").to_string();
            let response = match path.as_str() {
                "/ok" => {
                    "HTTP/1.1 200 OK\r\nx-test: yes\r\nx-REQUEST-id: 7\r\nContent-Length: 12\r\n\r\nhello world\n"
                        .to_string()
                }
                "/redirect" => {
                    "HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n".to_string()
                }
                "/chunked" => {
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nchunky\r\n0\r\n\r\n"
                        .to_string()
                }
                "/auth"
                    if head.contains("Authorization: Basic dTpw") && head.contains("X-Want: 1") =>
                {
                    "HTTP/1.1 204 No Content\r\n\r\n".to_string()
                }
                _ => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom"
                    .to_string(),
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, handle)
}

#[test]
fn http() {
    let scene = Scene::new();
    let (port, server) = http_server();
    let base = format!("http://127.0.0.1:{port}");
    let goss = format!(
        r#"
http:
  {base}/ok:
    status: 200
    body: [hello, "/wor.d/"]
    headers: ["X-Test: yes", "X-Request-Id: 7"]
  {base}/redirect:
    status: 200
    body: [hello]
  {base}/redirect?again:
    status: 302
    no-follow-redirects: true
  {base}/chunked:
    status: 200
    body: {{equal: chunky}}
  {base}/auth:
    status: 204
    username: u
    password: p
    request-headers: ["X-Want: 1"]
  {base}/broken:
    status: 200
    body: [hello]
"#
    );
    let report = scene.run(&goss, &Target::host());
    server.join().unwrap();
    expect(
        &report,
        &[
            ("HTTP", &format!("{base}/ok"), "status", Pass),
            ("HTTP", &format!("{base}/ok"), "body", Pass),
            ("HTTP", &format!("{base}/ok"), "headers", Pass),
            ("HTTP", &format!("{base}/redirect"), "status", Pass),
            ("HTTP", &format!("{base}/redirect"), "body", Pass),
            ("HTTP", &format!("{base}/redirect?again"), "status", Pass),
            ("HTTP", &format!("{base}/chunked"), "body", Pass),
            ("HTTP", &format!("{base}/auth"), "status", Pass),
            ("HTTP", &format!("{base}/broken"), "status", Fail),
            ("HTTP", &format!("{base}/broken"), "body", Skip),
        ],
    );
}

#[test]
fn includes_templates_skip_title_meta_and_retries() {
    let scene = Scene::new();
    scene.write(
        "parts/a.yaml",
        "file:\n  {{.Vars.dir}}/marker:\n    exists: true\n",
    );
    scene.write("parts/b.yaml", "command:\n  echo {{.Env.PHOENIX_TEST_WORD}}:\n    stdout: [\"{{.Env.PHOENIX_TEST_WORD}}\"]\n");
    scene.write("parts/skipped.yml", "this is not: [valid");
    // Reached only through `file:`, under a label of its own.
    scene.write("parts/c.yml", "command:\n  echo c:\n    exit-status: 0\n");
    scene.write("marker", "");
    let vars = scene.write(
        "vars.yaml",
        &format!("dir: {}\n", scene.dir.path().display()),
    );
    let main = scene.write(
        "goss.yaml",
        "gossfile:\n  parts/*.yaml: {}\n  parts/skipped.yml: {skip: true}\n  extra checks: {file: parts/c.yml}\nprocess:\n  phoenix-never:\n    running: true\n    skip: true\n    title: never runs\n    meta: {owner: ops}\n",
    );
    let data = TemplateData {
        vars: phoenix_check::load_vars(&vars).unwrap(),
        env: BTreeMap::from([("PHOENIX_TEST_WORD".to_string(), "phoenix".to_string())]),
    };
    let suite = load(&main, &data).unwrap();
    assert_eq!(suite.files.len(), 4, "{:?}", suite.files);
    assert!(suite.digest.starts_with("sha256:"));
    assert_eq!(
        phoenix_check::digest_of(&suite.files).as_deref(),
        Some(suite.digest.as_str())
    );
    scene.write(
        "parts/b.yaml",
        "command:\n  echo changed:\n    exit-status: 0\n",
    );
    assert_ne!(
        phoenix_check::digest_of(&suite.files).as_deref(),
        Some(suite.digest.as_str())
    );
    scene.write("parts/b.yaml", "command:\n  echo {{.Env.PHOENIX_TEST_WORD}}:\n    stdout: [\"{{.Env.PHOENIX_TEST_WORD}}\"]\n");
    assert_eq!(
        phoenix_check::digest_of(&suite.files).as_deref(),
        Some(suite.digest.as_str())
    );
    let report = run(&suite, &Target::host(), &RunOptions::default());
    let marker = format!("{}/marker", scene.dir.path().display());
    expect(
        &report,
        &[
            ("File", &marker, "exists", Pass),
            ("Command", "echo phoenix", "stdout", Pass),
            ("Command", "echo c", "exit-status", Pass),
            ("Process", "phoenix-never", "running", Skip),
        ],
    );
    let skipped = report.outcomes.iter().find(|o| o.result == Skip).unwrap();
    assert_eq!(
        (skipped.title.as_str(), skipped.meta.clone()),
        ("never runs", json!({"owner": "ops"}))
    );

    // Retries: a file that appears while the runner waits.
    let late = scene.path("late");
    let goss = scene.write(
        "late.yaml",
        &format!("file:\n  {}:\n    exists: true\n", late.display()),
    );
    let suite = load(&goss, &TemplateData::default()).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(late, "").unwrap();
    });
    let options = RunOptions {
        retry_timeout: Duration::from_secs(10),
        sleep: Duration::from_millis(100),
        ..RunOptions::default()
    };
    let report = run(&suite, &Target::host(), &options);
    writer.join().unwrap();
    assert!(report.passed(), "{report:#?}");
    assert!(report.attempts > 1, "{}", report.attempts);
}

/// goss's per-check `retry_count`/`retry_delay`: a command that passes on its third run passes
/// with two retries and fails with one; each run is counted in a file.
#[test]
fn retry_count_and_retry_delay_observe_a_check_again() {
    let scene = Scene::new();
    let tries = |retries: u32, delay: &str| {
        let counter = scene.path(&format!("count-{retries}"));
        let goss = format!(
            r#"command:
  third:
    exec: "echo x >> {counter}; test $(wc -l < {counter}) -ge 3"
    exit-status: 0
    retry_count: {retries}
    retry_delay: {delay}
"#,
            counter = counter.display()
        );
        let report = scene.run(&goss, &Target::host());
        let runs = std::fs::read_to_string(&counter).unwrap().lines().count();
        (status(&report, "Command", "third", "exit-status"), runs)
    };
    assert_eq!(tries(2, "10"), (Pass, 3));
    assert_eq!(tries(1, "10ms"), (Fail, 2));
    assert_eq!(tries(0, "0"), (Fail, 1));
    let (_, _, _, message) = load_error(
        &scene,
        "bad-delay.yaml",
        "command:\n  true:\n    exit-status: 0\n    retry_delay: soon\n",
    );
    assert!(message.contains("duration like 250ms"), "{message}");
    let (_, _, _, message) = load_error(
        &scene,
        "bad-count.yaml",
        "command:\n  true:\n    exit-status: 0\n    retry_count: -1\n",
    );
    assert!(message.contains("whole number"), "{message}");
}

fn load_error(scene: &Scene, name: &str, text: &str) -> (PathBuf, usize, usize, String) {
    let path = scene.write(name, text);
    match load(&path, &TemplateData::default()) {
        Err(SuiteError::Invalid {
            path,
            line,
            column,
            message,
        }) => (path, line, column, message),
        other => panic!("{name}: expected an invalid file, got {other:?}"),
    }
}

#[test]
fn malformed_files_name_file_line_and_key() {
    let scene = Scene::new();
    // A top-level key that is no resource type is skipped, as goss skips it, and said.
    let typo = scene.write(
        "type.yaml",
        "file:\n  /etc: {exists: true}\nfiles:\n  /x: {}\n",
    );
    let suite = load(&typo, &TemplateData::default()).unwrap();
    assert_eq!(suite.checks.len(), 1);
    assert!(
        suite.warnings[0].contains("type.yaml:3:1: unknown resource type \"files\" skipped"),
        "{:?}",
        suite.warnings
    );
    let cases = [
        (
            "attr.yaml",
            "file:\n  /etc:\n    exists: true\n    colour: red\n",
            4,
            "unknown attribute \"colour\" of file",
        ),
        (
            "matcher.yaml",
            "user:\n  root:\n    uid:\n      bigger-than: 1\n",
            4,
            "unknown matcher \"bigger-than\"",
        ),
        ("syntax.yaml", "file:\n  /etc:\n    exists: [true\n", 0, ""),
        (
            "template.yaml",
            "file:\n\n  {{.Vars.missing}}:\n    exists: true\n",
            3,
            "no key \"missing\": a missing .Vars key",
        ),
        (
            "port.yaml",
            "port:\n  tcp:http:\n    listening: true\n",
            2,
            "bad port",
        ),
        (
            "setting.yaml",
            "command:\n  x:\n    timeout: soon\n",
            3,
            "expected a number of milliseconds (0: the default)",
        ),
        (
            "dup.yaml",
            "file:\n  /a: {}\n  /a: {}\n",
            3,
            "duplicate key",
        ),
    ];
    for (name, text, line, message) in cases {
        let (path, got_line, column, got) = load_error(&scene, name, text);
        assert_eq!(path, scene.path(name));
        assert!(column >= 1, "{name}: {column}");
        if line > 0 {
            assert_eq!(got_line, line, "{name}: {got}");
            assert!(got.contains(message), "{name}: {got}");
        }
    }
    let error = load(
        &scene.write("e.yaml", "file:\n  /etc:\n    colour: red\n"),
        &TemplateData::default(),
    )
    .unwrap_err();
    assert!(
        error.to_string().starts_with(&format!(
            "{}:3:5: unknown attribute",
            scene.path("e.yaml").display()
        )),
        "{error}"
    );
}

#[test]
fn include_loops_are_detected() {
    let scene = Scene::new();
    scene.write("a.yaml", "gossfile:\n  b.yaml: {}\n");
    scene.write(
        "b.yaml",
        "file:\n  /etc: {exists: true}\ngossfile:\n  sub/c.yaml: {}\n",
    );
    scene.write("sub/c.yaml", "gossfile:\n  ../a.yaml: {}\n");
    let (path, line, _, message) = match load(&scene.path("a.yaml"), &TemplateData::default()) {
        Err(SuiteError::Invalid {
            path,
            line,
            column,
            message,
        }) => (path, line, column, message),
        other => panic!("expected a loop, got {other:?}"),
    };
    assert_eq!((path, line), (scene.path("sub/c.yaml"), 2));
    assert!(message.starts_with("include loop: "), "{message}");
    assert!(
        message.contains("a.yaml -> ") && message.ends_with("a.yaml"),
        "{message}"
    );
    // Including the same file twice without a loop is fine.
    scene.write("d.yaml", "gossfile:\n  b2.yaml: {}\n  b2.yaml2: {}\n");
    scene.write("b2.yaml", "file:\n  /etc: {exists: true}\n");
    std::os::unix::fs::symlink(scene.path("b2.yaml"), scene.path("b2.yaml2")).unwrap();
    assert_eq!(
        load(&scene.path("d.yaml"), &TemplateData::default())
            .unwrap()
            .checks
            .len(),
        1
    );
    let missing = load(
        &scene.write("m.yaml", "gossfile:\n  nope.yaml: {}\n"),
        &TemplateData::default(),
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("m.yaml:2:3: cannot include"),
        "{missing}"
    );
}

#[test]
fn report_formats() {
    let scene = Scene::new();
    let report = scene.run("file:\n  /:\n    exists: true\n  /nonexistent-x:\n    exists: true\n  /etc:\n    exists: true\n    skip: true\n", &Target::host());
    let plain = FormatOptions::default();
    let options = |given: &[&str]| FormatOptions::parse(given).unwrap();
    let show = |format, options: &FormatOptions| render(&report, format, options, false);

    // goss's JSON: one line, integer results, goss's field names.
    let text = show(Format::Json, &plain);
    assert_eq!(text.lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["summary"]["test-count"], 3);
    assert_eq!(json["summary"]["failed-count"], 1);
    assert_eq!(json["summary"]["skipped-count"], 1);
    assert!(
        json["summary"]["summary-line"]
            .as_str()
            .unwrap()
            .starts_with("Count: 3, Failed: 1, Skipped: 1, Duration: "),
        "{json}"
    );
    let failed = &json["results"][1];
    assert_eq!(
        (
            &failed["resource-id"],
            &failed["resource-type"],
            &failed["property"],
            &failed["result"],
            &failed["successful"],
            &failed["skipped"]
        ),
        (
            &json!("/nonexistent-x"),
            &json!("File"),
            &json!("exists"),
            &json!(1),
            &json!(false),
            &json!(false)
        )
    );
    assert_eq!(
        failed["matcher-result"],
        json!({"actual": false, "expected": true, "message": "to equal",
               "missing-elements": null, "found-elements": null, "extra-elements": null,
               "transform-chain": null, "untransformed-value": null})
    );
    assert_eq!(
        failed["summary-line-compact"],
        "File: /nonexistent-x: exists: Expected false to equal true"
    );
    assert_eq!(
        failed["summary-line"],
        "File: /nonexistent-x: exists:\nExpected\n    false\nto equal\n    true"
    );
    assert_eq!(
        (&json["results"][0]["result"], &json["results"][2]["result"]),
        (&json!(0), &json!(2))
    );
    assert!(json["results"][0]["duration"].is_u64());
    let start = json["results"][0]["start-time"].as_str().unwrap();
    assert!(
        start.len() >= 20 && start.ends_with('Z') && start.as_bytes()[10] == b'T',
        "{start}"
    );
    // pretty: goss's four-space indent.
    let pretty = show(Format::Json, &options(&["pretty"]));
    assert!(pretty.contains("\n    \"results\": ["), "{pretty}");
    // sort: by type and id.
    let sorted: serde_json::Value =
        serde_json::from_str(&show(Format::Json, &options(&["sort"]))).unwrap();
    let ids: Vec<&str> = (0..3)
        .map(|i| sorted["results"][i]["resource-id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["/", "/etc", "/nonexistent-x"]);

    let junit = show(Format::Junit, &plain);
    assert!(
        junit.contains("tests=\"3\" failures=\"1\" skipped=\"1\""),
        "{junit}"
    );
    assert_eq!(junit.matches("<testcase ").count(), 3);
    let tap = show(Format::Tap, &plain);
    assert_eq!(
        tap.lines().collect::<Vec<_>>(),
        [
            "1..3",
            "ok 1 - File: /: exists: matches expectation: true",
            "not ok 2 - File: /nonexistent-x: exists: Expected false to equal true",
            "ok 3 - # SKIP File: /etc: exists: skipped",
        ]
    );

    // rspecish, goss's default: marks, then failed and skipped checks in full, then counts.
    let rspec = show(Format::Rspecish, &plain);
    let expected_tail = "Failures/Skipped:\n\nFile: /etc: exists: skipped\n\nFile: /nonexistent-x: exists:\nExpected\n    false\nto equal\n    true\n\nTotal Duration: ";
    assert!(
        rspec.starts_with(&format!(".FS\n\n{expected_tail}"))
            && rspec.ends_with("Count: 3, Failed: 1, Skipped: 1\n"),
        "{rspec}"
    );
    let documentation = show(Format::Documentation, &plain);
    assert!(
        documentation.starts_with(
            "File: /: exists: matches expectation: true\nFile: /nonexistent-x: exists:\nExpected\n"
        ),
        "{documentation}"
    );
    let colored = render(&report, Format::Documentation, &plain, true);
    assert!(
        colored.contains("\x1b[31m") && colored.contains("\x1b[32m"),
        "{colored}"
    );
    assert_eq!(show(Format::Silent, &plain), "");

    // nagios: one status line (CRITICAL exits 2), perfdata, the failures when verbose.
    let nagios = show(Format::Nagios, &options(&["perfdata,verbose"]));
    let lines: Vec<&str> = nagios.lines().collect();
    assert!(
        lines[0].starts_with("GOSS CRITICAL - Count: 3, Failed: 1, Skipped: 1, Duration: ")
            && lines[0].contains("s|total=3 failed=1 skipped=1 duration="),
        "{nagios}"
    );
    assert_eq!(
        lines[1..],
        ["Fail 1 - File: /nonexistent-x: exists: Expected false to equal true"]
    );
    assert_eq!(
        (
            Format::Nagios.exit_status(&report),
            Format::Json.exit_status(&report)
        ),
        (2, 1)
    );

    // prometheus: goss's metric families, counted by type and outcome.
    let metrics = show(Format::Prometheus, &plain);
    for line in [
        "# TYPE goss_tests_outcomes_total counter",
        "goss_tests_outcomes_total{outcome=\"pass\",type=\"file\"} 1",
        "goss_tests_outcomes_total{outcome=\"fail\",type=\"file\"} 1",
        "goss_tests_outcomes_total{outcome=\"skip\",type=\"file\"} 1",
        "goss_tests_run_outcomes_total{outcome=\"fail\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    let verbose = show(Format::Prometheus, &options(&["verbose"]));
    assert!(
        verbose.contains(
            "goss_tests_outcomes_total{outcome=\"fail\",resource_id=\"/nonexistent-x\",type=\"file\"} 1"
        ),
        "{verbose}"
    );
    assert!(
        FormatOptions::parse(&["colour"])
            .unwrap_err()
            .contains("colour")
    );
    assert!("nagio".parse::<Format>().is_err());
}

#[test]
fn hundreds_of_checks_share_the_tables_of_one_run() {
    // 200 user checks and 200 port checks on the worker pool, all reading the same two tables.
    let scene = Scene::new();
    let mut goss = String::from("user:\n");
    for i in 0..200 {
        goss.push_str(&format!("  phoenix-nobody-{i}:\n    exists: false\n"));
    }
    goss.push_str("port:\n");
    for i in 0..200 {
        goss.push_str(&format!(
            "  tcp:{}:\n    listening: {{or: [true, false]}}\n",
            1000 + i
        ));
    }
    let report = scene.run(&goss, &Target::host());
    assert_eq!(report.outcomes.len(), 400);
    assert!(
        report.passed(),
        "{}",
        render(&report, Format::Rspecish, &FormatOptions::default(), false)
    );
}

/// goss's rules: `timeout: 0` is the default, and a suite with no check is an error (so an
/// empty file never passes a deploy gate).
#[test]
fn a_zero_timeout_is_the_default_and_an_empty_suite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = phoenix_check::TemplateData::default();
    let zero = dir.path().join("zero.yaml");
    std::fs::write(
        &zero,
        "command:\n  x:\n    exit-status: 0\n    exec: \"true\"\n    timeout: 0\n",
    )
    .unwrap();
    let suite = phoenix_check::load(&zero, &data).unwrap();
    assert_eq!(suite.checks[0].timeout_ms(10_000), 10_000);
    let empty = dir.path().join("empty.yaml");
    for text in ["", "# nothing here\n", "file: {}\n"] {
        std::fs::write(&empty, text).unwrap();
        let error = phoenix_check::load(&empty, &data).unwrap_err().to_string();
        assert!(error.contains("found 0 tests"), "{text:?}: {error}");
    }
}

/// goss's attributes that default to the key: the key names the check in the report, the
/// attribute says what is checked.
#[test]
fn attributes_that_default_to_the_key_name_what_is_checked() {
    let scene = Scene::new();
    let dir = scene.dir.path().display().to_string();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let goss = format!(
        "kernel-param:\n  the-host-name:\n    name: kernel.hostname\n    value: {host}\n\
         user:\n  superuser:\n    username: root\n    exists: true\n    uid: 0\n\
         group:\n  supergroup:\n    groupname: root\n    exists: true\n\
         interface:\n  loopback:\n    name: lo\n    exists: true\n\
         file:\n  the-dir:\n    path: {dir}\n    exists: true\n    filetype: directory\n\
         package:\n  no-such-thing:\n    name: phoenix-surely-not-a-package\n    installed: false\n",
        host = hostname.trim()
    );
    let report = scene.run(&goss, &Target::host());
    expect(
        &report,
        &[
            ("KernelParam", "the-host-name", "value", Status::Pass),
            ("User", "superuser", "exists", Status::Pass),
            ("User", "superuser", "uid", Status::Pass),
            ("Group", "supergroup", "exists", Status::Pass),
            ("Interface", "loopback", "exists", Status::Pass),
            ("File", "the-dir", "filetype", Status::Pass),
            ("Package", "no-such-thing", "installed", Status::Pass),
        ],
    );
}

/// A CA, a certificate it signed for `name`, and that certificate's key, as PEM.
struct Issued {
    cert: String,
    key: String,
}

fn issue(ca: &(rcgen::Certificate, rcgen::KeyPair), name: &str) -> Issued {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca.0, &ca.1)
        .unwrap();
    Issued {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn certificate_authority() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap(), key)
}

/// A TLS server answering every request 200 `secure`, requiring a client certificate from
/// `client_ca` when given; it serves `connections` connections.
fn https_server(
    server: &Issued,
    client_ca: Option<&str>,
    connections: usize,
) -> (u16, std::thread::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                .unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = std::sync::Arc::new(
        builder
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(server.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let mut tcp = stream.unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut tls = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            if head.is_empty() {
                continue; // a refused handshake
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure");
            tls.send_close_notify();
            let _ = tls.complete_io(&mut tcp);
        }
    });
    (port, handle)
}

/// An HTTP proxy for one CONNECT tunnel; it returns what it was asked.
fn connect_proxy() -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let target = head.split(' ').nth(1).unwrap().to_string();
        let mut upstream = std::net::TcpStream::connect(&target).unwrap();
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .unwrap();
        let (mut client_reader, mut upstream_writer) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut client_reader, &mut upstream_writer);
            let _ = upstream_writer.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut upstream, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
        head
    });
    (port, handle)
}

/// `https` checks as goss's: the server checked against `ca-file` (and refused when it is not
/// trusted), `allow-insecure`, a client certificate for a server that asks for one, and a
/// CONNECT `proxy`.
#[test]
fn https_with_ca_file_client_certificates_insecure_and_a_proxy() {
    let scene = Scene::new();
    let ca = certificate_authority();
    let server = issue(&ca, "127.0.0.1");
    let client = issue(&ca, "client");
    let ca_file = scene.write("ca.pem", &ca.0.pem());
    let cert_file = scene.write("client.pem", &client.cert);
    let key_file = scene.write("client.key", &client.key);

    let (port, plain_server) = https_server(&server, None, 4);
    let (proxy_port, proxy) = connect_proxy();
    let base = format!("https://127.0.0.1:{port}");
    let goss = format!(
        r#"
http:
  trusted:
    url: {base}/a
    status: 200
    body: [secure]
    ca-file: {ca}
  untrusted:
    url: {base}/b
    status: 200
  insecure:
    url: {base}/c
    status: 200
    allow-insecure: true
  proxied:
    url: {base}/d
    status: 200
    ca-file: {ca}
    proxy: http://127.0.0.1:{proxy_port}
"#,
        ca = ca_file.display()
    );
    let report = scene.run(&goss, &Target::host());
    plain_server.join().unwrap();
    let asked = proxy.join().unwrap();
    expect(
        &report,
        &[
            ("HTTP", "trusted", "status", Pass),
            ("HTTP", "trusted", "body", Pass),
            ("HTTP", "untrusted", "status", Fail),
            ("HTTP", "insecure", "status", Pass),
            ("HTTP", "proxied", "status", Pass),
        ],
    );
    let untrusted = report
        .outcomes
        .iter()
        .find(|o| o.resource_id == "untrusted")
        .unwrap();
    assert!(
        untrusted.error.contains("certificate"),
        "{}",
        untrusted.error
    );
    assert!(
        asked.starts_with(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n")),
        "{asked}"
    );

    let (port, mtls_server) = https_server(&server, Some(&ca.0.pem()), 2);
    let base = format!("https://127.0.0.1:{port}");
    let goss = format!(
        r#"
http:
  with-certificate:
    url: {base}/
    status: 200
    ca-file: {ca}
    cert-file: {cert}
    key-file: {key}
  without-certificate:
    url: {base}/
    status: 200
    ca-file: {ca}
"#,
        ca = ca_file.display(),
        cert = cert_file.display(),
        key = key_file.display()
    );
    let report = scene.run(&goss, &Target::host());
    mtls_server.join().unwrap();
    expect(
        &report,
        &[
            ("HTTP", "with-certificate", "status", Pass),
            ("HTTP", "without-certificate", "status", Fail),
        ],
    );
}

/// goss's documented examples of `semver-constraint`, `gjson` and `xml`, as written in its
/// docs, and what fails them.
#[test]
fn semver_gjson_and_xml_matchers() {
    let scene = Scene::new();
    let goss = r#"
matching:
  semver1:
    content: ["1.0.1", "1.9.9"]
    matches:
      semver-constraint: ">1.0.0 <2.0.0 !=1.5.0"
  semver2:
    content: 1.0.1
    matches:
      not:
        semver-constraint: ">5.0.0"
  semver-fails:
    content: "2.1.0"
    matches:
      semver-constraint: ">5.0.0 || < 1.5.0"
  json:
    content: '{"foo": "bar", "moo": {"nested": "cow"}, "count": "15"}'
    matches:
      gjson:
        moo.nested: cow
        foo: {have-prefix: b}
        count: {le: 25}
        '@this': {have-key: "foo"}
        moo:
          and:
            - {have-key: "nested"}
            - {not: {have-key: "nested2"}}
  json-missing:
    content: '{"foo": "bar"}'
    matches:
      gjson:
        nope: 1
  xml:
    content: |
      <?xml version="1.0" encoding="UTF-8"?>
      <order date="2019-02-01"><items>
        <book isbn="9780544003415"><title>Le seigneur des anneaux</title></book>
      </items></order>
    matches:
      xml:
        xpath: "boolean(//book[title='Le seigneur des anneaux'])"
        result: "true"
  xml-fails:
    content: "<a><b>1</b></a>"
    matches:
      xml:
        xpath: "count(//b)"
        result: "2"
"#;
    let report = scene.run(goss, &Target::host());
    expect(
        &report,
        &[
            ("Matching", "semver1", "matches", Pass),
            ("Matching", "semver2", "matches", Pass),
            ("Matching", "semver-fails", "matches", Fail),
            ("Matching", "json", "matches", Pass),
            ("Matching", "json-missing", "matches", Fail),
            ("Matching", "xml", "matches", Pass),
            ("Matching", "xml-fails", "matches", Fail),
        ],
    );
    let missing = report
        .outcomes
        .iter()
        .find(|o| o.resource_id == "json-missing")
        .unwrap();
    assert_eq!(missing.error, "Path not found: nope");
    let (_, line, _, message) = load_error(
        &scene,
        "bad-xpath.yaml",
        "matching:\n  x:\n    content: a\n    matches:\n      xml: {xpath: \"//[\", result: x}\n",
    );
    assert_eq!(line, 5);
    assert!(message.contains("bad XPath"), "{message}");
    // An entity bomb in the checked XML is an error, not a machine's memory.
    let bomb = format!(
        "matching:\n  bomb:\n    content: '<?xml version=\"1.0\"?><!DOCTYPE l [<!ENTITY a \"{}\">{}]><l>&j;</l>'\n    matches:\n      xml: {{xpath: \"string(/l)\", result: x}}\n",
        "lol".repeat(10),
        (b'b'..=b'j')
            .map(|c| format!(
                "<!ENTITY {} \"{}\">",
                c as char,
                format!("&{};", (c - 1) as char).repeat(10)
            ))
            .collect::<String>()
    );
    let report = scene.run(&bomb, &Target::host());
    assert_eq!(status(&report, "Matching", "bomb", "matches"), Fail);
}

/// `dns` with `server`: every record type goss queries, asked of a real DNS server (dnsmasq on
/// a free loopback port, serving records this test defines), printed as goss prints them.
#[test]
fn dns_with_a_server_answers_every_record_type() {
    if !std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
            "PHOENIX_REQUIRE_TOOLS is set but dnsmasq is missing"
        );
        eprintln!("skipped: dnsmasq is not installed (apt-get install dnsmasq-base)");
        return;
    }
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dnsmasq = Command::new("/usr/sbin/dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--user=root",
            &format!("--port={port}"),
            "--host-record=web.test,10.1.2.3,fd00::3",
            "--cname=alias.test,web.test",
            "--mx-host=mail.test,mx1.test,10",
            "--srv-host=_http._tcp.web.test,web.test,80,0,5",
            "--txt-record=txt.test,v=spf1 -all",
            "--ptr-record=3.2.1.10.in-addr.arpa,web.test",
            "--caa-record=caa.test,0,issue,letsencrypt.org",
        ])
        .spawn()
        .unwrap();
    let dnsmasq = Reaped(dnsmasq);
    // dnsmasq answers once it listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && !std::fs::read_to_string("/proc/net/udp")
            .unwrap()
            .contains(&format!(":{port:04X} "))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let scene = Scene::new();
    let server = format!("127.0.0.1:{port}");
    // goss's 500 ms default is for a real resolver; a loaded CI machine can stall dnsmasq longer.
    let timeout_ms = 5000;
    let goss = format!(
        r#"
dns:
  web.test:
    resolvable: true
    addrs: ["10.1.2.3", "fd00::3"]
    server: {server}
    timeout: {timeout_ms}
  A:web.test:
    addrs: {{consist-of: ["10.1.2.3"]}}
    server: {server}
    timeout: {timeout_ms}
  CNAME:alias.test:
    addrs: ["web.test."]
    server: {server}
    timeout: {timeout_ms}
  MX:mail.test:
    addrs: ["10 mx1.test."]
    server: {server}
    timeout: {timeout_ms}
  SRV:_http._tcp.web.test:
    addrs: ["0 5 80 web.test."]
    server: {server}
    timeout: {timeout_ms}
  TXT:txt.test:
    addrs: ["v=spf1 -all"]
    server: {server}
    timeout: {timeout_ms}
  PTR:10.1.2.3:
    addrs: ["web.test."]
    server: {server}
    timeout: {timeout_ms}
  CAA:caa.test:
    addrs: ["0 issue letsencrypt.org"]
    server: {server}
    timeout: {timeout_ms}
  nowhere.test:
    resolvable: false
    server: {server}
    timeout: {timeout_ms}
"#
    );
    let report = scene.run(&goss, &Target::host());
    drop(dnsmasq);
    let ids = [
        "web.test",
        "A:web.test",
        "CNAME:alias.test",
        "MX:mail.test",
        "SRV:_http._tcp.web.test",
        "TXT:txt.test",
        "PTR:10.1.2.3",
        "CAA:caa.test",
        "nowhere.test",
    ];
    for id in ids {
        for outcome in report.outcomes.iter().filter(|o| o.resource_id == id) {
            assert_eq!(
                outcome.result, Pass,
                "{id} {}: found {:?} {}",
                outcome.property, outcome.found, outcome.error
            );
        }
    }
    assert_eq!(report.outcomes.len(), 10);
}
