//! Network policy between roles: `db` allows `api` (and 127.0.0.1 from outside the bridge),
//! so it answers `api`'s instances and refuses `web`'s — through its proxy and directly —, a
//! local user who is not root, and other source addresses; every refusal is counted per role
//! pair in `/metrics` and `status`, and all of it holds across a deploy of each role. Runs
//! `phoenix up` (as root, in a network namespace of its own) with nftables.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Phoenix, hello_bin, processes_under, text};
use serde_json::Value;

fn runnable() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: containers and nftables need root");
        return false;
    }
    if !std::path::Path::new("/usr/sbin/nft").exists() {
        eprintln!("skipped: no nft (Debian's nftables package)");
        return false;
    }
    true
}

/// A busybox root with the hello app; roles web, api and db, db guarded.
fn fleet_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("ctx/rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "nc", "printf", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::copy(hello_bin(), dir.path().join("ctx/hello")).unwrap();
    let role = |name: &str, extra: &str| {
        format!(
            "[role.{name}]\nimage = \"app\"\ninstances = 1\nlisten = \"127.0.0.1:0\"\nstop_timeout = \"2s\"\n{extra}\n[role.{name}.health]\ninterval = \"100ms\"\n\n"
        )
    };
    let fleet = format!(
        "[image.app]\ncontext = \"ctx\"\nfrom = {{ dir = \"rootfs\" }}\n\
         copy = [{{ src = \"hello\", dst = \"/bin/hello\", libraries = true }}]\n\
         entrypoint = [\"/bin/hello\"]\n\n{}{}{}",
        role("web", ""),
        role("api", ""),
        role(
            "db",
            "allow_from = [\"api\"]\nallow_cidrs = [\"127.0.0.1/32\"]\n"
        ),
    );
    std::fs::write(dir.path().join("phoenix.toml"), fleet).unwrap();
    dir
}

/// The role's one live instance: its name and address.
fn instance(phoenix: &Phoenix, role: &str) -> (String, SocketAddr) {
    let status = phoenix.status();
    let role = role_status(&status, role);
    let live = role["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == role["live_generation"])
        .unwrap()["instances"][0]
        .clone();
    (
        live["name"].as_str().unwrap().to_string(),
        live["address"].as_str().unwrap().parse().unwrap(),
    )
}

fn role_status(status: &Value, role: &str) -> Value {
    status["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == role)
        .unwrap()
        .clone()
}

fn listen(phoenix: &Phoenix, role: &str) -> SocketAddr {
    role_status(&phoenix.status(), role)["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A GET from inside `role`'s instance to `host:port` (busybox nc, 2 s to connect).
fn get_from(phoenix: &Phoenix, role: &str, host: &str, port: u16) -> Output {
    let (name, _) = instance(phoenix, role);
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} {port}");
    phoenix.cli(&["exec", &name, "--", "/bin/sh", "-c", &script])
}

fn answered(output: &Output, by: &str) -> bool {
    text(&output.stdout).contains(&format!("hello from {by}-"))
}

/// The bridge's address (where every role's proxy listens for instances), from /etc/hosts.
fn gateway(phoenix: &Phoenix) -> String {
    let (name, _) = instance(phoenix, "web");
    let hosts = phoenix.cli_ok(&["exec", &name, "--", "/bin/cat", "/etc/hosts"]);
    hosts
        .lines()
        .find_map(|l| l.strip_suffix("\tdb"))
        .unwrap_or_else(|| panic!("no `db` in /etc/hosts:\n{hosts}"))
        .to_string()
}

/// Refused packets to db, by source, from `phoenix status --json`.
fn refused(phoenix: &Phoenix, source: &str) -> u64 {
    let db = role_status(&phoenix.status(), "db");
    db["policy"]["denied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["from"] == source || (d["from"].is_null() && d["kind"] == source))
        .map(|d| d["packets"].as_u64().unwrap())
        .unwrap_or(0)
}

/// A connection to `addr` from the host side of Phoenix's namespace, from source address
/// `from`: whether it was accepted.
fn connects_from(phoenix: &Phoenix, from: &str, addr: SocketAddr) -> bool {
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    phoenix.netns.as_ref().unwrap().run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(from).unwrap();
            matches!(
                tokio::time::timeout(Duration::from_secs(3), socket.connect(addr)).await,
                Ok(Ok(_))
            )
        })
    })
}

/// What must hold in every generation: api in, web out (counted exactly), through the proxy.
fn api_in_web_out(phoenix: &Phoenix, gateway: &str, port: u16) {
    let via_api = get_from(phoenix, "api", gateway, port);
    assert!(
        answered(&via_api, "db"),
        "api reaches db: {}{}",
        text(&via_api.stdout),
        text(&via_api.stderr)
    );
    let before = refused(phoenix, "web");
    for _ in 0..3 {
        let via_web = get_from(phoenix, "web", gateway, port);
        assert!(
            !answered(&via_web, "db"),
            "web is refused: {}",
            text(&via_web.stdout)
        );
        assert!(
            text(&via_web.stderr).contains("refused"),
            "a reset, not a timeout: {}",
            text(&via_web.stderr)
        );
    }
    assert_eq!(
        refused(phoenix, "web"),
        before + 3,
        "each refusal counted once"
    );
}

#[test]
fn db_answers_api_and_refuses_web_across_deploys_counting_every_refusal() {
    if !runnable() {
        return;
    }
    let mut phoenix = Phoenix::launch(fleet_dir(), &[], Some(common::Netns::new()));
    for role in ["web", "api", "db"] {
        phoenix.wait_role(role, 1);
    }
    let gateway = gateway(&phoenix);
    let port = listen(&phoenix, "db").port();
    api_in_web_out(&phoenix, &gateway, port);
    // Unguarded roles stay open to everyone.
    let api_port = listen(&phoenix, "api").port();
    assert!(answered(
        &get_from(&phoenix, "web", &gateway, api_port),
        "api"
    ));

    // Straight to db's instance, around the proxy: api gets through, web's SYNs are dropped.
    let (_, db_addr) = instance(&phoenix, "db");
    let (ip, db_port) = (db_addr.ip().to_string(), db_addr.port());
    assert!(answered(&get_from(&phoenix, "api", &ip, db_port), "db"));
    let before = refused(&phoenix, "web");
    assert!(!answered(&get_from(&phoenix, "web", &ip, db_port), "db"));
    let direct = refused(&phoenix, "web") - before;
    assert!(
        (1..=3).contains(&direct),
        "one SYN and its retries: {direct}"
    );

    // From outside the bridge: 127.0.0.1 is allowed, 127.0.0.2 and the bridge's own address
    // (a local process connecting to db's proxy there) are not.
    let db_listen = listen(&phoenix, "db");
    assert!(phoenix.get(db_listen, "/").contains("hello from db-"));
    assert_eq!(refused(&phoenix, "outside"), 0);
    assert!(!connects_from(&phoenix, "127.0.0.2", db_listen));
    let bridge_side: SocketAddr = format!("{gateway}:{port}").parse().unwrap();
    assert!(!connects_from(&phoenix, &gateway, bridge_side));
    assert_eq!(refused(&phoenix, "outside"), 2);
    // A local user who is not root cannot reach db's instance directly; root (the proxy and
    // the health checks) can.
    let nobody = common::connect_as_nobody(phoenix.netns.as_ref().unwrap(), db_addr);
    assert!(
        text(&nobody.stderr).contains("refused"),
        "{}",
        text(&nobody.stderr)
    );
    assert_eq!(refused(&phoenix, "host"), 1);
    assert!(phoenix.get(db_addr, "/").contains("hello from db-"));

    // Counted per pair in /metrics and shown by status.
    let metrics = phoenix.api_get("/metrics");
    let web_line = format!(
        "phoenix_policy_denied_total{{to=\"db\",kind=\"role\",from=\"web\"}} {}",
        refused(&phoenix, "web")
    );
    assert!(metrics.contains(&web_line), "{web_line} in:\n{metrics}");
    assert!(
        metrics.contains("phoenix_policy_denied_total{to=\"db\",kind=\"role\",from=\"api\"} 0")
    );
    assert!(metrics.contains("phoenix_policy_denied_total{to=\"db\",kind=\"outside\"} 2"));
    let status = phoenix.cli_ok(&["status"]);
    assert!(
        status.contains(&format!(
            "policy: allow from api; from outside 127.0.0.1/32; refused web {}, outside 2, host 1",
            refused(&phoenix, "web")
        )),
        "{status}"
    );

    // New generations of each role: new addresses, the same policy.
    for role in ["api", "db", "web"] {
        let (old, _) = instance(&phoenix, role);
        let deployed = phoenix.cli_ok(&["deploy", role]);
        assert!(
            deployed.contains(&format!("deployed {role} generation")),
            "{deployed}"
        );
        assert_ne!(instance(&phoenix, role).0, old);
        api_in_web_out(&phoenix, &gateway, port);
    }
    let (_, db_addr) = instance(&phoenix, "db");
    assert!(answered(
        &get_from(&phoenix, "api", &db_addr.ip().to_string(), db_addr.port()),
        "db"
    ));
    // The rules go with `phoenix up`.
    assert!(phoenix.interrupt().success());
    let mut tables = Command::new("/usr/sbin/nft");
    tables.args(["list", "tables"]);
    phoenix.netns.as_ref().unwrap().apply(&mut tables);
    assert_eq!(text(&tables.output().unwrap().stdout), "");
}

/// Sends `count` gratuitous ARP replies claiming `claimed` from `eth0` of the network
/// namespace of process `pid`, with a raw socket: what any process of an instance with
/// Docker's default capabilities (`CAP_NET_RAW`) can do.
fn forge_arp(pid: u32, own_mac: [u8; 6], claimed: [u8; 4], count: usize) {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns, socket and sendto on descriptors and buffers this thread owns.
        unsafe {
            assert_eq!(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET), 0);
            let socket = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ARP as u16).to_be()),
            );
            assert!(socket >= 0, "{}", std::io::Error::last_os_error());
            let index = libc::if_nametoindex(c"eth0".as_ptr());
            assert!(index > 0);
            let mut frame = vec![0xff; 6];
            frame.extend(own_mac);
            frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
            frame.extend(own_mac);
            frame.extend(claimed);
            frame.extend([0xff; 6]);
            frame.extend(claimed);
            let mut to: libc::sockaddr_ll = std::mem::zeroed();
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = index as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            for _ in 0..count {
                let sent = libc::sendto(
                    socket,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    sent,
                    frame.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(socket);
        }
    })
    .join()
    .unwrap();
}

#[test]
fn an_instance_cannot_take_another_instances_address() {
    if !runnable() {
        return;
    }
    let mut phoenix = Phoenix::launch(fleet_dir(), &[], Some(common::Netns::new()));
    for role in ["web", "api", "db"] {
        phoenix.wait_role(role, 1);
    }
    // web's instance claims api's address in gratuitous ARP: were it believed, the host would
    // send api's traffic (and db's answers to api) to web. Frames from a link whose source
    // address is not that link's own are dropped at the bridge, and counted.
    let (_, api_addr) = instance(&phoenix, "api");
    assert!(phoenix.get(api_addr, "/").contains("hello from api-"));
    let status = phoenix.status();
    let web = role_status(&status, "web");
    let web_pid = web["generations"][0]["instances"][0]["pid"]
        .as_u64()
        .unwrap() as u32;
    let (_, web_addr) = instance(&phoenix, "web");
    let std::net::IpAddr::V4(web_ip) = web_addr.ip() else {
        panic!("IPv4")
    };
    let std::net::IpAddr::V4(api_ip) = api_addr.ip() else {
        panic!("IPv4")
    };
    let [a, b, c, d] = web_ip.octets();
    // Past the neighbour table's lock time (1 s), an unsolicited reply would replace the entry.
    std::thread::sleep(Duration::from_millis(1500));
    forge_arp(web_pid, [0x02, 0x50, a, b, c, d], api_ip.octets(), 2);
    let table = format!("phx{}", phoenix_driver::state_hash(&phoenix.state()));
    let mut command = Command::new("/usr/sbin/nft");
    command.args(["list", "counter", "bridge", &table, "spoofed"]);
    phoenix.netns.as_ref().unwrap().apply(&mut command);
    let spoofed = text(&command.output().unwrap().stdout);
    assert!(spoofed.contains("packets 2 "), "{spoofed}");
    // The host's neighbour entry for api's address still names api's MAC, never web's.
    let arp = phoenix
        .netns
        .as_ref()
        .unwrap()
        .run(|| std::fs::read_to_string("/proc/thread-self/net/arp").unwrap());
    let [a, b, c, d] = api_ip.octets();
    let api_mac = format!("02:50:{a:02x}:{b:02x}:{c:02x}:{d:02x}");
    let entry = arp
        .lines()
        .find(|l| l.starts_with(&format!("{api_ip} ")))
        .unwrap_or_else(|| panic!("no entry for {api_ip}:\n{arp}"));
    let web_mac = format!(
        "02:50:{:02x}:{:02x}:{:02x}:{:02x}",
        web_ip.octets()[0],
        web_ip.octets()[1],
        web_ip.octets()[2],
        web_ip.octets()[3]
    );
    assert!(
        entry.contains(&api_mac) && !entry.contains(&web_mac),
        "{entry}"
    );
}

#[test]
fn a_policy_that_cannot_be_enforced_stops_phoenix_up() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !runnable() {
        return;
    }
    // As a user without root the isolating driver cannot run: the process driver would run
    // db on the host's network, where nothing can guard it. `phoenix up` must refuse.
    let fleet = fleet_dir();
    let place = tempfile::tempdir().unwrap();
    std::fs::set_permissions(place.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let phoenix = place.path().join("phoenix");
    std::fs::copy(common::phoenix_bin(), &phoenix).unwrap();
    std::fs::set_permissions(&phoenix, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = place.path().join("fleet");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fleet.path().join("phoenix.toml"), dir.join("phoenix.toml")).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let mut up = Command::new(&phoenix)
        .arg("up")
        .current_dir(&dir)
        .env("HOME", &dir)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while up.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            up.kill().unwrap();
            panic!("phoenix up ran with a policy it cannot enforce");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = up.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("role db has a network policy (allow_from, allow_cidrs)")
            && stderr.contains("cannot be enforced here"),
        "{stderr}"
    );
}

#[test]
fn a_restart_keeps_the_bridge_the_policy_and_every_instance() {
    if !runnable() {
        return;
    }
    let mut phoenix = Phoenix::launch(fleet_dir(), &[], Some(common::Netns::new()));
    for role in ["web", "api", "db"] {
        phoenix.wait_role(role, 1);
    }
    let pids = processes_under(&phoenix.state());
    let gateway = gateway(&phoenix);
    let port = listen(&phoenix, "db").port();
    let (_, db_addr) = instance(&phoenix, "db");

    let out = phoenix.cli_ok(&["restart"]);
    assert!(out.contains("3 of 3 instances kept running"), "{out}");
    assert_eq!(
        processes_under(&phoenix.state()),
        pids,
        "the same instances"
    );
    assert_eq!(
        instance(&phoenix, "db").1,
        db_addr,
        "the same address on the bridge"
    );
    // The policy holds for the instances taken over, through the proxy and around it.
    api_in_web_out(&phoenix, &gateway, port);
    let (ip, db_port) = (db_addr.ip().to_string(), db_addr.port());
    let direct = get_from(&phoenix, "api", &ip, db_port);
    assert!(
        answered(&direct, "db"),
        "api reaches db's instance: {}{}\n{}",
        text(&direct.stdout),
        text(&direct.stderr),
        phoenix.log()
    );
    assert!(!answered(&get_from(&phoenix, "web", &ip, db_port), "db"));
    // A new instance after the restart gets a free address, not a kept one.
    phoenix.cli_ok(&["scale", "web", "2"]);
    phoenix.wait_role("web", 2);
    let status = phoenix.status();
    let mut addrs: Vec<String> = status["roles"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["generations"].as_array().unwrap().clone())
        .flat_map(|g| g["instances"].as_array().unwrap().clone())
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let count = addrs.len();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), count, "no address handed out twice: {addrs:?}");
}
