//! Memberlist's wire format against Debian's `serf agent`: Phoenix's codec
//! (`phoenix_gossip::memberlist`) pings a real Serf agent over UDP and reads its ack, joins it
//! by a TCP push-pull and reads its state, and keeps a member alive in Serf's eyes by answering
//! its probes, trades user events with it by gossip, answers its query, until it stops answering and Serf
//! declares it failed; then all of it again
//! sealed with a key from Serf's keyring.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phoenix_gossip::memberlist::{
    self, Ack, MessageType, NodeState, Ping, PushNodeState, PushPull, SerfMessage, SerfMessageType,
    SerfPushPull, SerfUserEvent,
};
use phoenix_gossip::{Key, Keyring};

struct SerfAgent {
    child: Child,
    /// Its standard output: Serf's log.
    log: std::path::PathBuf,
    serf: std::path::PathBuf,
    rpc: String,
    gossip: SocketAddr,
}

impl Drop for SerfAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SerfAgent {
    fn start(serf: std::path::PathBuf, dir: &std::path::Path, extra: &[&str]) -> SerfAgent {
        let (port, rpc_port) = (common::free_port(), common::free_port());
        let gossip: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let rpc = format!("127.0.0.1:{rpc_port}");
        let log = dir.join("s1.log");
        let child = Command::new(&serf)
            .args(["agent", "-node", "s1", "-bind", &gossip.to_string()])
            .args(["-rpc-addr", &rpc, "-tag", "role=web", "-tag", "dc=lab"])
            .args(extra)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = SerfAgent {
            child,
            log,
            serf,
            rpc,
            gossip,
        };
        common::wait_for("serf's RPC", Duration::from_secs(30), || {
            agent.members_output().is_some()
        });
        agent
    }

    /// `serf members` as Serf prints it, or None while its RPC is not up.
    fn members_output(&self) -> Option<String> {
        let out = Command::new(&self.serf)
            .args(["members", &format!("-rpc-addr={}", self.rpc)])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The status Serf gives `name`, if it lists it.
    fn status_of(&self, name: &str) -> Option<String> {
        let members = self.members_output()?;
        let line = members.lines().find(|line| line.starts_with(name))?;
        line.split_whitespace().nth(2).map(str::to_string)
    }
}

/// The memberlist version triple and Serf's, as a current Serf agent announces itself.
const VSN: [u8; 6] = [1, 5, 2, 2, 5, 4];

#[test]
fn phoenix_speaks_memberlist_with_a_serf_agent_both_ways() {
    let Some(serf) = common::serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = SerfAgent::start(serf, dir.path(), &[]);
    speak_with(&agent, None);
}

#[test]
fn phoenix_speaks_memberlist_sealed_with_serfs_keyring() {
    let Some(serf) = common::serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate().unwrap();
    let agent = SerfAgent::start(serf, dir.path(), &["-encrypt", &key.to_base64()]);
    let keyring = Keyring::new(key);

    // Serf drops what is not sealed with its key: a plain ping and one sealed with another
    // key get no answer.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let ping = memberlist::encode(MessageType::Ping, &ping_from(&udp, 1)).unwrap();
    let stranger = Keyring::new(Key::generate().unwrap());
    for keys in [None, Some(&stranger)] {
        let packet = memberlist::packet(std::slice::from_ref(&ping), "", keys).unwrap();
        udp.send_to(&packet, agent.gossip).unwrap();
        assert!(
            udp.recv_from(&mut [0u8; 1024]).is_err(),
            "Serf answered {keys:?}"
        );
    }
    speak_with(&agent, Some(&keyring));
}

fn ping_from(udp: &UdpSocket, seq_no: u32) -> Ping {
    let ours = udp.local_addr().unwrap();
    Ping {
        seq_no,
        node: "s1".into(),
        source_addr: memberlist::ip_bytes(ours.ip()),
        source_port: ours.port(),
        source_node: "p1".into(),
    }
}

/// Pings, joins, keeps p1 alive, then lets Serf declare it failed.
fn speak_with(agent: &SerfAgent, keyring: Option<&Keyring>) {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ours = udp.local_addr().unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // 1. A ping Phoenix encodes gets Serf's ack, with Serf's network coordinate in it.
    let ping = memberlist::encode(MessageType::Ping, &ping_from(&udp, 4242)).unwrap();
    let sent = memberlist::packet(&[ping], "", keyring).unwrap();
    let ack = ask_for_ack(&udp, agent.gossip, &sent, 4242, keyring);
    assert_eq!(ack.payload.first(), Some(&1), "Serf's ping payload version");
    let coordinate: BTreeMap<String, rmpv_like::Value> =
        rmp_serde::from_slice(&ack.payload[1..]).unwrap();
    let vector = coordinate["Vec"].as_floats();
    assert_eq!(
        vector.len(),
        8,
        "Serf's coordinates have 8 dimensions: {coordinate:?}"
    );

    // 2. A join by push-pull: Serf reads Phoenix's nodes and Serf state, and answers with its own.
    let tags = BTreeMap::from([("role".to_string(), "lb".to_string())]);
    let push = PushPull {
        join: true,
        nodes: vec![PushNodeState {
            name: "p1".into(),
            addr: memberlist::ip_bytes(ours.ip()),
            port: ours.port(),
            meta: memberlist::encode_tags(&tags).unwrap(),
            incarnation: 1,
            state: NodeState::Alive,
            vsn: VSN.to_vec(),
        }],
        serf: Some(SerfPushPull {
            ltime: 1,
            status_ltimes: BTreeMap::from([("p1".to_string(), 1)]),
            ..SerfPushPull::default()
        }),
    };
    let mut stream = TcpStream::connect(agent.gossip).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    memberlist::write_push_pull(&mut stream, &push, "", keyring).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = memberlist::read_push_pull(&mut stream, keyring).unwrap();
    assert!(
        answer.join,
        "memberlist answers a join with the join flag it was sent"
    );
    let s1 = answer
        .nodes
        .iter()
        .find(|node| node.name == "s1")
        .unwrap_or_else(|| panic!("s1 in {answer:?}"));
    assert_eq!(s1.address(), Some(agent.gossip));
    assert_eq!(s1.state, NodeState::Alive);
    let s1_tags = memberlist::decode_tags(&s1.meta).unwrap();
    assert_eq!(s1_tags.get("role").map(String::as_str), Some("web"));
    assert_eq!(s1_tags.get("dc").map(String::as_str), Some("lab"));
    let serf_state = answer.serf.expect("Serf's own push-pull state");
    assert!(
        serf_state.status_ltimes.contains_key("s1"),
        "{serf_state:?}"
    );

    // 3. Serf lists the member Phoenix announced, with its tags, and keeps it alive while
    //    Phoenix answers its probes.
    let heard = Arc::new(Heard::default());
    heard.answering.store(true, Ordering::SeqCst);
    let responder = {
        let (udp, heard, keyring) = (udp.try_clone().unwrap(), heard.clone(), keyring.cloned());
        std::thread::spawn(move || answer_pings(&udp, keyring.as_ref(), &heard))
    };
    common::wait_for("Serf to list p1 as alive", Duration::from_secs(10), || {
        agent.status_of("p1").as_deref() == Some("alive")
    });
    let members = agent.members_output().unwrap();
    let p1 = members.lines().find(|l| l.starts_with("p1")).unwrap();
    assert!(
        p1.contains(&ours.to_string()) && p1.contains("role=lb"),
        "{members}"
    );
    // Serf probes a member about once a second; after 4 probes answered it still says alive.
    common::wait_for(
        "Serf to probe p1 four times",
        Duration::from_secs(20),
        || heard.answered.load(Ordering::SeqCst) >= 4,
    );
    assert_eq!(
        agent.status_of("p1").as_deref(),
        Some("alive"),
        "{:?}",
        agent.members_output()
    );

    // 4. User events both ways: one fired at Serf reaches p1 by gossip; one Phoenix gossips
    //    reaches Serf's agent, which logs it as received. Then a query.
    let fired = Command::new(&agent.serf)
        .args(["event", &format!("-rpc-addr={}", agent.rpc), "deploy", "v2"])
        .output()
        .unwrap();
    common::succeeded("serf event", fired);
    common::wait_for("Serf's user event at p1", Duration::from_secs(20), || {
        heard
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.name == "deploy")
    });
    let deploy = heard.events.lock().unwrap()[0].clone();
    assert_eq!(
        (deploy.name.as_str(), deploy.payload.as_slice()),
        ("deploy", &b"v2"[..])
    );
    assert!(deploy.cc, "serf event coalesces unless told not to");
    let event = SerfUserEvent {
        ltime: deploy.ltime + 1,
        name: "from-phoenix".into(),
        payload: b"hello".to_vec(),
        cc: false,
    };
    let message = memberlist::encode_serf(SerfMessageType::UserEvent, &event).unwrap();
    let packet = memberlist::packet(&[message], "", keyring).unwrap();
    udp.send_to(&packet, agent.gossip).unwrap();
    common::wait_for(
        "Serf to receive Phoenix's event",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&agent.log)
                .unwrap()
                .contains("Received event: user-event: from-phoenix")
        },
    );

    // A query fired at Serf reaches p1, whose ack and answer reach `serf query`.
    let asked = Command::new(&agent.serf)
        .args(["query", &format!("-rpc-addr={}", agent.rpc), "-timeout=3s"])
        .args(["uptime", "now"])
        .output()
        .unwrap();
    let asked = common::succeeded("serf query", asked);
    assert!(asked.contains("Ack from 'p1'"), "{asked}");
    assert!(
        asked.contains("Response from 'p1': p1 got uptime"),
        "{asked}"
    );
    assert!(asked.contains("Total Acks: 2"), "s1 and p1: {asked}");
    // Serf's filters travel with the query: p1 does not answer one for role=web only.
    let asked = Command::new(&agent.serf)
        .args(["query", &format!("-rpc-addr={}", agent.rpc), "-timeout=2s"])
        .args(["-tag", "role=web", "uptime"])
        .output()
        .unwrap();
    let asked = common::succeeded("serf query -tag role=web", asked);
    assert!(
        asked.contains("Ack from 's1'") && !asked.contains("'p1'"),
        "{asked}"
    );

    // 5. Phoenix stops answering: Serf suspects p1, then declares it failed.
    heard.answering.store(false, Ordering::SeqCst);
    let stopped = Instant::now();
    common::wait_for("Serf to declare p1 failed", Duration::from_secs(60), || {
        agent.status_of("p1").as_deref() == Some("failed")
    });
    eprintln!(
        "Serf declared p1 failed {:?} after its last ack",
        stopped.elapsed()
    );
    responder.join().unwrap();
}

/// Sends `ping` until an ack with `seq_no` comes back (UDP may drop one), for 10 s at most.
fn ask_for_ack(
    udp: &UdpSocket,
    to: SocketAddr,
    ping: &[u8],
    seq_no: u32,
    keyring: Option<&Keyring>,
) -> Ack {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65_536];
    while Instant::now() < deadline {
        udp.send_to(ping, to).unwrap();
        let Ok((len, _)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let packet = memberlist::parse_packet(&buf[..len], keyring).unwrap();
        for (kind, body) in packet.messages {
            if kind == MessageType::Ack {
                let ack: Ack = memberlist::decode(&body).unwrap();
                if ack.seq_no == seq_no {
                    return ack;
                }
            }
        }
    }
    panic!("no ack from Serf at {to}");
}

/// What p1 heard from Serf, and whether it still answers probes.
#[derive(Default)]
struct Heard {
    answering: AtomicBool,
    answered: AtomicUsize,
    events: Mutex<Vec<SerfUserEvent>>,
}

/// Answers Serf's pings to p1 while `answering` and keeps the user events gossiped to it;
/// returns once `answering` is cleared and 5 s passed without a ping answered.
fn answer_pings(udp: &UdpSocket, keyring: Option<&Keyring>, heard: &Heard) {
    let (answering, answered) = (&heard.answering, &heard.answered);
    let mut buf = [0u8; 65_536];
    let mut quiet_since = Instant::now();
    loop {
        if !answering.load(Ordering::SeqCst) && quiet_since.elapsed() > Duration::from_secs(5) {
            return;
        }
        let Ok((len, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let Ok(packet) = memberlist::parse_packet(&buf[..len], keyring) else {
            continue;
        };
        for (kind, body) in packet.messages {
            if kind == MessageType::User {
                match memberlist::decode_serf(&body) {
                    Ok(SerfMessage::UserEvent(event)) => heard.events.lock().unwrap().push(event),
                    Ok(SerfMessage::Query(query)) => answer_query(udp, keyring, &query),
                    _ => {}
                }
            }
            if kind != MessageType::Ping || !answering.load(Ordering::SeqCst) {
                continue;
            }
            let ping: Ping = memberlist::decode(&body).unwrap();
            assert_eq!(ping.node, "p1", "Serf names the node it means to reach");
            let ack = Ack {
                seq_no: ping.seq_no,
                payload: Vec::new(),
            };
            let reply = memberlist::encode(MessageType::Ack, &ack).unwrap();
            let reply = memberlist::packet(&[reply], "", keyring).unwrap();
            udp.send_to(&reply, from).unwrap();
            answered.fetch_add(1, Ordering::SeqCst);
            quiet_since = Instant::now();
        }
    }
}

/// Acks a query when asked to and answers it, to the address the query gives, when its
/// filters address p1.
fn answer_query(udp: &UdpSocket, keyring: Option<&Keyring>, query: &memberlist::SerfQuery) {
    let tags = BTreeMap::from([("role".to_string(), "lb".to_string())]);
    if !query.addressed_to("p1", &tags) {
        return;
    }
    let to = query.reply_to().expect("a query says where answers go");
    let mut responses = Vec::new();
    if query.wants_ack() {
        responses.push(query.response("p1", true, Vec::new()));
    }
    responses.push(query.response("p1", false, format!("p1 got {}", query.name).into_bytes()));
    for response in responses {
        let message = memberlist::encode_serf(SerfMessageType::QueryResponse, &response).unwrap();
        let packet = memberlist::packet(&[message], "", keyring).unwrap();
        udp.send_to(&packet, to).unwrap();
    }
}

/// Just enough of a msgpack value to read Serf's coordinate.
mod rmpv_like {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Value {
        Floats(Vec<f64>),
        Other(serde::de::IgnoredAny),
    }

    impl Value {
        pub fn as_floats(&self) -> &[f64] {
            match self {
                Value::Floats(floats) => floats,
                _ => &[],
            }
        }
    }
}
