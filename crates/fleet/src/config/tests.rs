use super::*;

fn parse(text: &str) -> Result<FleetFile, ConfigError> {
    FleetFile::parse(Path::new("fleet/phoenix.toml"), text)
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const GOOD: &str = r#"
[image.hello]
from = "scratch"
copy = [{ src = "hello", dst = "/bin/hello" }]
entrypoint = ["/bin/hello"]

[role.web]
image = "hello"
listen = "127.0.0.1:8080"
"#;

#[test]
fn the_example_fleet_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/phoenix.toml");
    let fleet = FleetFile::load(&path).unwrap();
    let web = &fleet.roles["web"];
    assert_eq!(web.instances, 3);
    assert_eq!(web.health.interval, Duration::from_millis(500));
    assert_eq!(web.deploy.drain, Duration::from_secs(30));
    assert_eq!(fleet.images["hello"].env["VERSION"], "v1");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let fleet = parse(GOOD).unwrap();
    let web = &fleet.roles["web"];
    assert_eq!(web.instances, 1);
    assert_eq!(web.health, HealthConfig::default());
    assert_eq!(web.deploy, DeployConfig::default());
    assert_eq!(fleet.dir, Path::new("fleet"));
}

#[test]
fn unknown_keys_name_file_line_column_and_key() {
    let text = format!("{GOOD}instancs = 3\n");
    assert_eq!(
        error(&text),
        "fleet/phoenix.toml:10:1: [role.web] key `instancs`: unknown field `instancs`, expected one of \
         `image`, `instances`, `listen`, `stop_timeout`, `health`, `deploy`, `proxy`, `drift_check`, `autoscale`, `max_age`, `chaos`, \
         `driver`, `runtime`, `network`, `port`, `user`, `allow_root`, `resources`, `env`, `secrets`, `allow_from`, `allow_cidrs`, `logs`, `hosts`"
    );
    let text = GOOD.replace("from = \"scratch\"", "from = \"scratch\"\nentrypiont = []");
    let message = error(&text);
    assert!(
        message.starts_with(
            "fleet/phoenix.toml:4:1: [image.hello] key `entrypiont`: unknown field `entrypiont`"
        ),
        "{message}"
    );
}

#[test]
fn bad_values_name_the_key() {
    let text = format!("{GOOD}\n[role.web.health]\ninterval = \"5 seconds\"\n");
    assert_eq!(
        error(&text),
        "fleet/phoenix.toml:12:12: [role.web.health] key `interval`: invalid duration \"5 seconds\": \
         write a whole number and a unit, like \"500ms\", \"2s\", \"1m\", \"1h\" or \"7d\""
    );
    let text = GOOD.replace("127.0.0.1:8080", "localhost");
    assert!(
        error(&text).starts_with(
            "fleet/phoenix.toml:9:10: [role.web] key `listen`: invalid socket address"
        ),
        "{}",
        error(&text)
    );
    let text = format!("{GOOD}\n[role.web.deploy]\nstrategy = \"rolled\"\n");
    assert!(
        error(&text).contains(
            "key `strategy`: unknown variant `rolled`, expected one of `blue-green`, `canary`, `rolling`"
        ),
        "{}",
        error(&text)
    );
    let text = GOOD.replace(
        "from = \"scratch\"",
        "from = { debian = \"bookworm\", tar = \"root.tar\" }",
    );
    assert!(
        error(&text).contains("key `from`: `from` names two bases"),
        "{}",
        error(&text)
    );
}

#[test]
fn cross_references_and_ranges_are_checked() {
    let text = GOOD.replace("image = \"hello\"", "image = \"helo\"");
    assert_eq!(
        error(&text),
        "fleet/phoenix.toml:8:9: [role.web] key `image`: no [image.helo] in this file (images: hello)"
    );
    let text = GOOD.replace("listen =", "instances = 0\nlisten =");
    assert!(
        error(&text).starts_with(
            "fleet/phoenix.toml:9:13: [role.web] key `instances`: must be between 1 and 256"
        ),
        "{}",
        error(&text)
    );
    let text = GOOD.replace("[role.web]", "[role.Web]");
    assert!(
        error(&text).contains("role name \"Web\" may only hold a-z, 0-9 and `-`"),
        "{}",
        error(&text)
    );
    let text = format!("{GOOD}\n[role.web.health]\nhealthy_threshold = 0\n");
    assert!(
        error(&text).contains("thresholds must be at least 1"),
        "{}",
        error(&text)
    );
}

#[test]
fn durations_that_cannot_work_are_refused_where_they_are_written() {
    let cases = [
        (
            "[role.web.health]\ninterval = \"0s\"",
            "12:12: [role.web.health] key `interval`: \"0s\" is out of range: write between 10ms and 24h",
        ),
        (
            "[role.web.health]\ntimeout = \"0ms\"",
            "12:11: [role.web.health] key `timeout`: \"0ms\" is out of range: write between 1ms and 24h",
        ),
        (
            "[role.web.proxy]\nidle_timeout = \"99999999999h\"",
            "12:16: [role.web.proxy] key `idle_timeout`: \"99999999999h\" is out of range",
        ),
        (
            "[role.web.deploy]\ndrain = \"25h\"",
            "12:9: [role.web.deploy] key `drain`: \"25h\" is out of range: write between 0s and 24h",
        ),
        (
            "[role.web.autoscale]\nmin = 1\nmax = 2\ninterval = \"1ms\"",
            "14:12: [role.web.autoscale] key `interval`: \"1ms\" is out of range",
        ),
        (
            "[role.web.chaos]\nevery = \"0s\"",
            "12:9: [role.web.chaos] key `every`: \"0s\" is out of range",
        ),
    ];
    for (table, expected) in cases {
        let message = error(&format!("{GOOD}\n{table}\n"));
        assert!(
            message.starts_with(&format!("fleet/phoenix.toml:{expected}")),
            "{table}: {message}"
        );
    }
    let text = format!("{GOOD}\n[role.web.proxy]\nmax_connections = 0\n");
    assert!(
        error(&text).starts_with("fleet/phoenix.toml:12:19: [role.web.proxy] key `max_connections`: 0 is out of range: write between 1 and 1000000"),
        "{}",
        error(&text)
    );
    let text = format!(
        "{GOOD}\n[role.web.proxy]\nmax_connections = 500\nmax_connections_per_client = 20\nrequest_head_timeout = \"5s\"\n"
    );
    let proxy = parse(&text).unwrap().roles["web"].proxy.to_proxy_config();
    assert_eq!(
        (
            proxy.max_connections,
            proxy.max_connections_per_client,
            proxy.request_head_timeout
        ),
        (500, Some(20), Duration::from_secs(5))
    );
    let text = GOOD.replace("listen =", "stop_timeout = \"99999999999h\"\nlisten =");
    assert!(
        error(&text).starts_with("fleet/phoenix.toml:9:16: [role.web] key `stop_timeout`: \"99999999999h\" is out of range: write between 0s and 24h"),
        "{}",
        error(&text)
    );
    // The ends of each range are accepted.
    let text = format!(
        "{GOOD}\n[role.web.health]\ninterval = \"10ms\"\ntimeout = \"24h\"\n[role.web.deploy]\ndrain = \"0s\"\n"
    );
    let web = &parse(&text).unwrap().roles["web"];
    assert_eq!(web.health.interval, Duration::from_millis(10));
    assert_eq!(web.health.timeout, Duration::from_secs(86_400));
    assert_eq!(web.deploy.drain, Duration::ZERO);
}

#[test]
fn two_roles_on_one_listen_address_are_refused_naming_both() {
    let api = "\n[role.api]\nimage = \"hello\"\nlisten = \"0.0.0.0:8080\"\n";
    assert_eq!(
        error(&format!("{GOOD}{api}")),
        "fleet/phoenix.toml:9:10: [role.web] key `listen`: 127.0.0.1:8080 collides with [role.api] listen = \"0.0.0.0:8080\"; give each role its own port"
    );
    // Other ports, other addresses and "any free port" are fine.
    for listen in ["127.0.0.1:8081", "127.0.0.2:8080"] {
        let other = api.replace("0.0.0.0:8080", listen);
        assert!(parse(&format!("{GOOD}{other}")).is_ok(), "{listen}");
    }
    let zero = GOOD.replace("127.0.0.1:8080", "127.0.0.1:0");
    let other = api.replace("0.0.0.0:8080", "127.0.0.1:0");
    assert!(parse(&format!("{zero}{other}")).is_ok());
}

#[test]
fn a_table_written_twice_is_named_whole_with_its_first_line() {
    let text = format!("{GOOD}\n[role.web]\nimage = \"hello\"\n");
    assert_eq!(
        error(&text),
        "fleet/phoenix.toml:11:7: [role.web] is defined twice (first at line 7): write its keys in one table"
    );
}

#[test]
fn syntax_errors_have_positions_too() {
    let message = error("[role.web\nimage = 1");
    assert!(message.starts_with("fleet/phoenix.toml:1:"), "{message}");
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    for bad in ["", "5", "ms", "1.5s", "-1s", "2 s", "1w"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
    }
}

/// Seeded mutation fuzzing: whatever bytes the file holds, parsing returns a value or an error
/// pointing inside the file, and never panics.
#[test]
fn mutated_fleet_files_never_panic_and_errors_point_inside_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/phoenix.toml");
    let seed_text = std::fs::read_to_string(path).unwrap();
    let alphabet: Vec<char> = "[]{}=\".,:#\n 0123456789abcxyz_-é\u{1F525}\\'"
        .chars()
        .collect();
    let mut rng = fastrand::Rng::with_seed(0x9e0e);
    for _ in 0..3000 {
        let mut chars: Vec<char> = seed_text.chars().collect();
        for _ in 0..rng.usize(1..6) {
            let at = rng.usize(..=chars.len());
            match rng.u8(..3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, alphabet[rng.usize(..alphabet.len())]),
                _ if at < chars.len() => chars[at] = alphabet[rng.usize(..alphabet.len())],
                _ => {}
            }
        }
        let text: String = chars.into_iter().collect();
        crate::fuzzing::fleet_file(text.as_bytes());
    }
}

#[test]
fn the_agent_table_takes_the_agent_options_and_checks_them() {
    let fleet = parse(GOOD).unwrap();
    assert_eq!(fleet.agent, None, "no table: a lone agent is used");
    let text = format!(
        "{GOOD}\n[agent]\nnode = \"host-a\"\njoin = [\"10.0.0.2\"]\ntags = {{ dc = \"east\" }}\n\
         event_handlers = [\"member-join=./on-join.sh\"]\nreconnect_interval = \"10s\"\n"
    );
    let agent = parse(&text).unwrap().agent.unwrap();
    assert_eq!(agent.node.as_deref(), Some("host-a"));
    assert_eq!(agent.bind, "127.0.0.1:7946".parse().unwrap());
    assert_eq!(agent.rpc_addr, "127.0.0.1:7373".parse().unwrap());
    assert_eq!(agent.join, vec!["10.0.0.2".to_string()]);
    assert_eq!(agent.tags["dc"], "east");
    assert_eq!(agent.reconnect_interval, Duration::from_secs(10));
    assert_eq!(agent.reap_after, Duration::from_secs(24 * 3600));

    let typo = format!("{GOOD}\n[agent]\nbnid = \"127.0.0.1:1\"\n");
    let message = error(&typo);
    assert!(
        message.starts_with("fleet/phoenix.toml:12:1: [agent] key `bnid`: unknown field `bnid`"),
        "{message}"
    );
    let open_rpc = format!("{GOOD}\n[agent]\nrpc_addr = \"0.0.0.0:7373\"\n");
    let message = error(&open_rpc);
    assert!(
        message.contains(":11:1: [agent] key `rpc_addr`: 0.0.0.0:7373 is not loopback"),
        "{message}"
    );
    let bad_key = format!("{GOOD}\n[agent]\nencrypt = \"not base64!\"\n");
    let message = error(&bad_key);
    assert!(message.contains("[agent] key `encrypt`"), "{message}");
    let open_gossip = format!("{GOOD}\n[agent]\nbind = \"0.0.0.0:7946\"\n");
    let message = error(&open_gossip);
    assert!(
        message.contains("[agent] key `bind`: 0.0.0.0:7946 is not loopback: gossip beyond this machine must be encrypted"),
        "{message}"
    );
    let empty = format!("{GOOD}\n[agent]\nrpc_addr = \"0.0.0.0:7373\"\nrpc_auth = \"\"\n");
    let message = error(&empty);
    assert!(
        message.contains("[agent] key `rpc_auth`: an empty token is refused"),
        "{message}"
    );
}

#[test]
fn the_gossip_key_can_live_in_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fleet_path = dir.path().join("phoenix.toml");
    let key = "cGhvZW5peC1nb3NzaXAtdGVzdC1rZXktMzItYnl0ZSE=";
    let text =
        format!("{GOOD}\n[agent]\nbind = \"10.0.0.5:7946\"\nencrypt_file = \"gossip.key\"\n");
    let key_file = dir.path().join("gossip.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = FleetFile::parse(&fleet_path, &text).unwrap().agent.unwrap();
    assert_eq!(agent.encrypt.as_deref(), Some(key));
    assert_eq!(
        agent.cluster_key().unwrap(),
        b"phoenix-gossip-test-key-32-byte!"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let message = FleetFile::parse(&fleet_path, &text)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("can be read by other users (mode 644)"),
        "{message}"
    );
    std::fs::write(&key_file, "short").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let message = FleetFile::parse(&fleet_path, &text)
        .unwrap_err()
        .to_string();
    assert!(message.contains("[agent] key `encrypt_file`"), "{message}");
    let both = text.replace(
        "encrypt_file",
        &format!("encrypt = \"{key}\"\nencrypt_file"),
    );
    let message = FleetFile::parse(&fleet_path, &both)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("set `encrypt` or `encrypt_file`, not both"),
        "{message}"
    );
}

#[test]
fn network_policies_are_read_and_checked_where_they_are_written() {
    let two_roles = |db: &str, api: &str| {
        format!(
            "{GOOD}\n[role.api]\nimage = \"hello\"\nlisten = \"127.0.0.1:8081\"\n{api}\n\n[role.db]\nimage = \"hello\"\nlisten = \"127.0.0.1:8082\"\n{db}\n"
        )
    };
    let fleet = parse(&two_roles(
        "allow_from = [\"api\", \"web\"]\nallow_cidrs = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]",
        "",
    ))
    .unwrap();
    let guard = fleet.roles["db"].guard.clone().unwrap();
    assert_eq!(guard.allow_from, ["api", "web"]);
    let cidrs: Vec<String> = guard.allow_cidrs.iter().map(|c| c.to_string()).collect();
    assert_eq!(cidrs, ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]);
    assert_eq!(fleet.roles["api"].guard, None);
    // An empty list still guards: nobody may.
    let closed = parse(&two_roles("allow_from = []", "")).unwrap();
    assert_eq!(
        closed.roles["db"].guard.clone().unwrap().allow_from.len(),
        0
    );

    let unknown = error(&two_roles("allow_from = [\"apj\"]", ""));
    assert!(
        unknown.starts_with("fleet/phoenix.toml:19:15: ")
            && unknown.contains(
                "[role.db] key `allow_from`: no [role.apj] in this file (roles: api, db, web)"
            ),
        "{unknown}"
    );
    let bad = error(&two_roles("allow_cidrs = [\"10.0.0.1/8\"]", ""));
    assert!(
        bad.starts_with("fleet/phoenix.toml:19:16: ") && bad.contains("has host bits set"),
        "{bad}"
    );
    let host = error(&two_roles("allow_from = [\"api\"]\nnetwork = \"host\"", ""));
    assert!(host.contains("[role.db]: a network policy"), "{host}");
    let allowed_on_host = error(&two_roles("allow_from = [\"api\"]", "network = \"host\""));
    assert!(
        allowed_on_host.contains("role api runs on the host's network")
            && allowed_on_host.contains(":19:15: "),
        "{allowed_on_host}"
    );
}

#[test]
fn logs_take_retention_by_role_and_sinks_by_url() {
    let text = format!(
        "{GOOD}logs = {{ max_size = \"64MiB\", max_age = \"2d\" }}\n\
         [role.api]\nimage = \"hello\"\nlisten = \"127.0.0.1:8081\"\n\n\
         [logs]\nmax_age = \"3d\"\n\n\
         [logs.forward.central]\nurl = \"tcp://127.0.0.1:5514\"\nroles = [\"web\"]\n\n\
         [logs.forward.loki]\nurl = \"http://127.0.0.1:3100\"\n"
    );
    let fleet = parse(&text).unwrap();
    assert_eq!(
        fleet.roles["web"].logs,
        LogRetention {
            max_size: 64 << 20,
            max_age: Duration::from_secs(2 * 86_400)
        }
    );
    assert_eq!(
        fleet.roles["api"].logs,
        LogRetention {
            max_size: 1 << 30,
            max_age: Duration::from_secs(3 * 86_400)
        }
    );
    let central = &fleet.logs.forward["central"];
    assert_eq!(
        central.url,
        Sink::SyslogTcp("127.0.0.1:5514".parse().unwrap())
    );
    assert_eq!(central.roles, ["web"]);
    assert_eq!(
        fleet.logs.forward["loki"].url,
        Sink::Loki {
            addr: "127.0.0.1:3100".parse().unwrap(),
            path: "/loki/api/v1/push".into()
        }
    );
    // Without [logs]: 1 GiB and 7 days a role, no sinks.
    let plain = parse(GOOD).unwrap();
    assert_eq!(plain.roles["web"].logs, LogRetention::default());
    assert_eq!(
        plain.roles["web"].logs.max_age,
        Duration::from_secs(7 * 86_400)
    );
    assert!(plain.logs.forward.is_empty());
}

#[test]
fn bad_logs_settings_name_the_line_and_the_key() {
    let cases = [
        (
            "[logs.forward.x]\nurl = \"syslog://h:1\"\n",
            "unknown scheme \"syslog\"",
        ),
        (
            "[logs.forward.x]\nurl = \"tcp://127.0.0.1\"\n",
            "has no port",
        ),
        (
            "[logs.forward.x]\nurl = \"tcp://127.0.0.1:51a4\"\n",
            "is not HOST:PORT with a known host and a port number",
        ),
        (
            "[logs.forward.x]\nurl = \"https://127.0.0.1:1/x\"\n",
            "not supported yet",
        ),
        (
            "[logs.forward.x]\nurl = \"udp://127.0.0.1:514\"\nroles = [\"wbe\"]\n",
            "[logs.forward.x] key `roles`: no [role.wbe] in this file (roles: web)",
        ),
        ("[logs]\nmax_size = \"10KiB\"\n", "too small"),
        ("[logs]\nmax_age = \"5s\"\n", "out of range"),
        ("[logs]\nmax_sise = \"1GiB\"\n", "unknown field `max_sise`"),
        (
            "[logs.forward.x]\nurl = \"tcp://127.0.0.1:514\"\nrole = []\n",
            "unknown field `role`",
        ),
    ];
    let lines = GOOD.lines().count();
    for (extra, expected) in cases {
        let message = error(&format!("{GOOD}\n{extra}"));
        assert!(message.contains(expected), "{extra}: {message}");
        let line: usize = message.split(':').nth(1).unwrap().parse().unwrap();
        assert!(line > lines, "{extra}: {message}");
    }
}

#[test]
fn a_cluster_table_is_read_and_its_mistakes_named() {
    let fleet = parse(&format!(
        "{GOOD}hosts = {{ tag = [\"zone=a\", \"disk=ssd\"] }}\n\n[cluster]\netcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\nprefix = \"/phoenix/prod\"\n"
    ))
    .unwrap();
    let cluster = fleet.cluster.unwrap();
    assert_eq!(cluster.prefix, "/phoenix/prod/");
    assert_eq!(cluster.lease, Duration::from_secs(3));
    assert_eq!(
        fleet.roles["web"].hosts.tags,
        [
            ("zone".to_string(), "a".to_string()),
            ("disk".into(), "ssd".into())
        ]
    );
    assert!(parse(GOOD).unwrap().cluster.is_none());
    for (table, says) in [
        ("etcd = []", "list at least one etcd client URL"),
        (
            "etcd = [\"10.0.0.1:2379\"]",
            "must start with http:// or https://",
        ),
        ("etcd = [\"http://10.0.0.1\"]", "has no port"),
        ("etcd = [\"https://e:2379\"]", "[cluster] key `ca`"),
        (
            "etcd = [\"http://e:2379\"]\nprefix = \"phoenix\"",
            "[cluster] key `prefix`",
        ),
        (
            "etcd = [\"http://e:2379\"]\nlease = \"1s\"",
            "write between 2s and 1m",
        ),
        (
            "etcd = [\"http://127.0.0.1:2379\"]\nuser = \"root\"",
            "also give `password_file`",
        ),
        (
            "etcd = [\"http://10.0.0.1:2379\"]\nuser = \"root\"\npassword_file = \"p\"",
            "the password would cross the network in clear text to http://10.0.0.1:2379",
        ),
        (
            "etcd = [\"https://e:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"",
            "give both",
        ),
        (
            "etcd = [\"http://e:2379\"]\nendpoints = []",
            "unknown field `endpoints`",
        ),
    ] {
        let message = error(&format!("{GOOD}\n[cluster]\n{table}\n"));
        assert!(message.contains(says), "{table}: {message}");
        assert!(message.contains("fleet/phoenix.toml:"), "{message}");
    }
    let message = error(&format!("{GOOD}hosts = {{ tag = \"zone\" }}\n"));
    assert!(
        message.contains("[role.web] key `hosts`: tag \"zone\" must be KEY=VALUE"),
        "{message}"
    );
}

#[test]
fn the_etcd_password_comes_from_an_owner_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fleet_path = dir.path().join("phoenix.toml");
    let text = format!(
        "{GOOD}\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nuser = \"phoenix\"\npassword_file = \"etcd.password\"\n"
    );
    let file = dir.path().join("etcd.password");
    std::fs::write(&file, "hunter2\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cluster = FleetFile::parse(&fleet_path, &text)
        .unwrap()
        .cluster
        .unwrap();
    assert_eq!(cluster.password.as_deref(), Some("hunter2"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let message = FleetFile::parse(&fleet_path, &text)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("[cluster] key `password_file`"),
        "{message}"
    );
    assert!(
        message.contains("can be read by other users (mode 640)"),
        "{message}"
    );
}

#[test]
fn published_ports_start_where_the_network_table_says() {
    let fleet = parse(&format!("{GOOD}\n[network]\nfirst_host_port = 30000\n")).unwrap();
    assert_eq!(fleet.network.first_host_port, Some(30000));
    assert_eq!(parse(GOOD).unwrap().network.first_host_port, None);
    let low = error(&format!("{GOOD}\n[network]\nfirst_host_port = 80\n"));
    assert!(
        low.contains("[network] key `first_host_port`: 80 is a privileged port"),
        "{low}"
    );
    let huge = error(&format!("{GOOD}\n[network]\nfirst_host_port = 70000\n"));
    assert!(huge.contains("first_host_port"), "{huge}");
}

#[test]
fn listeners_are_read_and_their_mistakes_named() {
    let listener = |body: &str| format!("{GOOD}\n[listener.public]\n{body}\n");
    let fleet = parse(&listener(
        "listen = \"127.0.0.1:8443\"\ntls = { cert = \"c.pem\", key = \"k.pem\" }\nhsts = \"1d\"\nroutes = [{ host = \"*.example.test\", path_prefix = \"/assets\", role = \"web\" }]",
    ))
    .unwrap();
    let public = &fleet.listeners["public"];
    assert_eq!(public.tls.len(), 1);
    assert!(public.tls[0].cert.is_absolute());
    assert_eq!(public.hsts, Some(Duration::from_secs(86_400)));
    assert_eq!(public.describe_routes(), "*.example.test/assets → web");
    for (body, says) in [
        ("listen = \"127.0.0.1:8443\"", "say where requests go"),
        (
            "listen = \"127.0.0.1:8443\"\nrole = \"web\"\nroutes = [{ role = \"web\" }]",
            "either `role`",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nrole = \"nope\"",
            "no role \"nope\"",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nrole = \"web\"\nhsts = \"1d\"",
            "HSTS needs `tls`",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nrole = \"web\"\nredirect_http = \"127.0.0.1:8080\"",
            "redirects to HTTPS need `tls`",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nroutes = [{ host = \"bad host\", role = \"web\" }]",
            "is not a host name",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nroutes = [{ path_prefix = \"assets\", role = \"web\" }]",
            "must start with /",
        ),
        (
            "listen = \"127.0.0.1:8443\"\nrole = \"web\"\ntls = \"x\"",
            "write tls = {",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nrole = \"web\"",
            "already role web's address",
        ),
    ] {
        let message = error(&listener(body));
        assert!(message.contains(says), "{body}: {message}");
        assert!(message.contains("phoenix.toml:"), "{message}");
    }
}

#[test]
fn a_canary_deploy_takes_its_steps_and_analysis_from_the_file() {
    let text = format!(
        "{GOOD}\n[role.web.deploy]\nstrategy = \"canary\"\nsteps = [\"1%\", \"12.5%\", \"50%\"]\ninterval = \"10s\"\nmin_requests = 500\nmax_error_increase = \"0.5%\"\nmax_p99_increase = \"150%\"\np99_tolerance = \"2ms\"\n"
    );
    let deploy = &parse(&text).unwrap().roles["web"].deploy;
    assert_eq!(deploy.strategy, Strategy::Canary);
    assert_eq!(
        deploy.canary,
        CanaryConfig {
            steps: vec![100, 1_250, 5_000],
            interval: Duration::from_secs(10),
            min_requests: 500,
            max_error_increase: 50,
            max_p99_increase: 15_000,
            p99_tolerance: Duration::from_millis(2),
        }
    );
    let text = format!("{GOOD}\n[role.web.deploy]\nstrategy = \"canary\"\n");
    assert_eq!(
        parse(&text).unwrap().roles["web"].deploy.canary,
        CanaryConfig::default()
    );
}

#[test]
fn canary_settings_that_cannot_work_are_refused_where_they_are_written() {
    for (deploy, expected) in [
        (
            "steps = [\"5%\"]",
            "11:1: [role.web]: `steps` applies to strategy = \"canary\" only",
        ),
        (
            "strategy = \"canary\"\nsteps = [\"50%\", \"25%\"]",
            "`steps`: \"25%\" does not grow",
        ),
        (
            "strategy = \"canary\"\nsteps = [\"100%\"]",
            "`steps`: \"100%\" is out of range",
        ),
        (
            "strategy = \"canary\"\nsteps = [\"five\"]",
            "`steps`: \"five\" is not a percentage",
        ),
        ("strategy = \"canary\"\nsteps = []", "`steps` is empty"),
        (
            "strategy = \"canary\"\nmax_surge = 2",
            "`max_surge` applies to strategy = \"rolling\" only (this deploy is canary)",
        ),
        (
            "strategy = \"rolling\"\nmax_surge = 0",
            "`max_surge` and `max_unavailable` are both 0",
        ),
        (
            "strategy = \"canary\"\ninterval = \"0s\"",
            "`interval`: \"0s\" is out of range",
        ),
        (
            "strategy = \"canary\"\nmin_requests = 0",
            "`min_requests`: 0 would judge a step on no traffic",
        ),
        (
            "strategy = \"canary\"\nmax_error_increase = \"101%\"",
            "`max_error_increase`: \"101%\" is out of range",
        ),
    ] {
        let text = format!("{GOOD}\n[role.web.deploy]\n{deploy}\n");
        let message = error(&text);
        assert!(
            message.starts_with("fleet/phoenix.toml:") && message.contains(expected),
            "{deploy}: {message}"
        );
    }
}

#[test]
fn a_rolling_deploy_takes_its_batches_from_the_file() {
    let text = format!(
        "{GOOD}\n[role.web.deploy]\nstrategy = \"rolling\"\nmax_surge = 0\nmax_unavailable = 2\n"
    );
    let deploy = &parse(&text).unwrap().roles["web"].deploy;
    assert_eq!(deploy.strategy, Strategy::Rolling);
    assert_eq!(
        deploy.rolling,
        RollingConfig {
            max_surge: 0,
            max_unavailable: 2
        }
    );
    let text = format!("{GOOD}\n[role.web.deploy]\nstrategy = \"rolling\"\n");
    assert_eq!(
        parse(&text).unwrap().roles["web"].deploy.rolling,
        RollingConfig::default()
    );
}

#[test]
fn hooks_are_programs_next_to_the_fleet_file_and_their_mistakes_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    std::fs::write(hooks.join("gate"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(hooks.join("gate"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(hooks.join("plain"), "not a program\n").unwrap();
    let file = dir.path().join("phoenix.toml");
    let parse = |body: &str| FleetFile::parse(&file, &format!("{GOOD}\n[hooks]\n{body}\n"));

    let fleet = parse(
        "before_switch = [\"./hooks/gate\", \"--strict\"]\nafter_switch = [\"logger\", \"-t\", \"phoenix\"]\ntimeout = \"5s\"",
    )
    .unwrap();
    let gate = fleet.hooks.command(Hook::BeforeSwitch).unwrap();
    assert_eq!(
        gate,
        [hooks.join("gate").display().to_string(), "--strict".into()]
    );
    assert_eq!(
        fleet.hooks.command(Hook::AfterSwitch).unwrap()[0],
        "logger",
        "found in PATH"
    );
    assert_eq!(fleet.hooks.command(Hook::BeforeBake), None);
    assert_eq!(fleet.hooks.timeout, Duration::from_secs(5));
    assert_eq!(parse("").unwrap().hooks.timeout, Duration::from_secs(60));
    assert!(Hook::BeforeSwitch.may_veto() && !Hook::AfterSwitch.may_veto());

    for (body, says) in [
        ("before_switch = []", "`before_switch` is empty"),
        (
            "on_abort = [\"./hooks/plain\"]",
            "hooks/plain is not an executable file",
        ),
        (
            "after_verify = [\"./hooks/missing\"]",
            "hooks/missing is not an executable file",
        ),
        ("before_deploy = [\"x\"]", "unknown field `before_deploy`"),
        ("timeout = \"0s\"", "timeout"),
        ("before_bake = \"./hooks/gate\"", "invalid type"),
        (
            "after_switch = [\"true\"]\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]",
            "[hooks] run on one machine only for now",
        ),
    ] {
        let message = parse(body).unwrap_err().to_string();
        assert!(message.contains(says), "{body}: {message}");
        assert!(message.contains("phoenix.toml:1"), "{body}: {message}");
    }
}

#[test]
fn webhooks_read_their_secret_and_their_mistakes_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.path().join("short.secret"), "abc").unwrap();
    std::fs::set_permissions(
        dir.path().join("short.secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(dir.path().join("open.secret"), "0123456789abcdef0123").unwrap();
    std::fs::set_permissions(
        dir.path().join("open.secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    let file = dir.path().join("phoenix.toml");
    let parse = |body: &str| {
        FleetFile::parse(
            &file,
            &format!("{GOOD}\n[webhook.chat]\nsecret_file = \"hook.secret\"\n{body}\n"),
        )
    };

    let fleet = parse(
        "url = \"https://hooks.example.test/phoenix?room=ops\"\nevents = [\"deploy.finished\", \"instance.*\"]\nca = \"ca.pem\"",
    )
    .unwrap();
    let chat = &fleet.webhooks["chat"];
    assert_eq!(
        chat.url,
        Endpoint {
            tls: true,
            host: "hooks.example.test".into(),
            port: 443,
            path: "/phoenix?room=ops".into()
        }
    );
    assert_eq!(chat.secret, "0123456789abcdef0123");
    assert!(
        !format!("{chat:?}").contains("0123456789"),
        "the secret stays out of Debug"
    );
    assert_eq!((chat.retries, chat.timeout), (5, Duration::from_secs(5)));
    assert!(chat.wants("deploy.finished") && chat.wants("instance.died"));
    assert!(!chat.wants("deploy.started") && !chat.wants("instances.x"));
    let all = parse("url = \"http://127.0.0.1:9000\"\nevents = [\"*\"]").unwrap();
    let all = &all.webhooks["chat"];
    assert_eq!((all.url.port, all.url.path.as_str()), (9000, "/"));
    assert!(all.wants("role.scaled") && !all.wants("webhook.failed"));
    assert_eq!(
        Endpoint::parse("http://[::1]:8080/x").unwrap().to_string(),
        "http://[::1]:8080/x"
    );

    for (body, says) in [
        (
            "url = \"ftp://x/\"\nevents = [\"*\"]",
            "is not an http:// or https:// URL",
        ),
        (
            "url = \"http://x:0/\"\nevents = [\"*\"]",
            "\"0\" is not a port number",
        ),
        (
            "url = \"http://u:p@x/\"\nevents = [\"*\"]",
            "credentials in the URL",
        ),
        (
            "url = \"http://bad host/\"\nevents = [\"*\"]",
            "is not a host name",
        ),
        ("url = \"http://x/\"\nevents = []", "`events` is empty"),
        (
            "url = \"http://x/\"\nevents = [\"deploys.*\"]",
            "\"deploys.*\" is not an event kind",
        ),
        (
            "url = \"http://x/\"\nevents = [\"deploy\"]",
            "\"deploy\" is not an event kind",
        ),
        (
            "url = \"http://x/\"\nevents = [\"*\"]\nca = \"ca.pem\"",
            "`ca` is for https:// URLs only",
        ),
        (
            "url = \"http://x/\"\nevents = [\"*\"]\nretry_delay = \"1ms\"",
            "retry_delay",
        ),
        (
            "url = \"http://x/\"\nevents = [\"*\"]\nsecret = \"inline\"",
            "unknown field `secret`",
        ),
    ] {
        let message = parse(body).unwrap_err().to_string();
        assert!(message.contains(says), "{body}: {message}");
        assert!(message.contains("phoenix.toml:1"), "{body}: {message}");
    }
    let with_secret = |secret: &str| {
        FleetFile::parse(
            &file,
            &format!("{GOOD}\n[webhook.chat]\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret_file = \"{secret}\"\n"),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(with_secret("short.secret").contains("holds 3 characters"));
    assert!(with_secret("open.secret").contains("can be read by other users"));
    assert!(with_secret("missing.secret").contains("missing.secret"));
    let in_cluster = FleetFile::parse(
        &file,
        &format!("{GOOD}\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n\n[webhook.chat]\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret_file = \"hook.secret\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        in_cluster.contains("[webhook] is sent from one machine only"),
        "{in_cluster}"
    );
}

#[test]
fn a_load_test_is_a_scenario_beside_the_fleet_file_and_its_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = "[[stage]]\nduration = \"5s\"\ntarget = 20\n";
    std::fs::write(dir.path().join("load.toml"), scenario).unwrap();
    std::fs::write(
        dir.path().join("broken.toml"),
        "[[stage]]\nduration = \"5 s\"\ntarget = 1\n",
    )
    .unwrap();
    let file = dir.path().join("phoenix.toml");
    let parse = |deploy: &str, more: &str| {
        FleetFile::parse(
            &file,
            &format!("{GOOD}\n[role.web.deploy]\n{deploy}\n{more}"),
        )
    };
    let fleet = parse("load_test = \"load.toml\"", "").unwrap();
    assert_eq!(
        fleet.roles["web"].deploy.load_test,
        Some(dir.path().join("load.toml"))
    );
    let canary = parse("strategy = \"canary\"\nload_test = \"load.toml\"", "").unwrap();
    assert!(canary.roles["web"].deploy.load_test.is_some());

    for (deploy, more, says) in [
        (
            "load_test = \"missing.toml\"",
            "",
            "`load_test`: cannot read load scenario",
        ),
        (
            "load_test = \"broken.toml\"",
            "",
            "broken.toml:2:12: `duration` \"5 s\"",
        ),
        ("load_test = \"\"", "", "`load_test` is empty"),
        (
            "strategy = \"rolling\"\nload_test = \"load.toml\"",
            "",
            "use strategy = \"blue-green\" or \"canary\"",
        ),
        (
            "load_test = \"load.toml\"",
            "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n",
            "[role.web.deploy] `load_test` runs on one machine only for now",
        ),
    ] {
        let message = parse(deploy, more).unwrap_err().to_string();
        assert!(message.contains(says), "{deploy}: {message}");
        assert!(message.contains("phoenix.toml:1"), "{deploy}: {message}");
    }
}
