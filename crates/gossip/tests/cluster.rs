//! Real agents on loopback UDP sockets: join, tags, user events, graceful leave, failure,
//! encryption and hostile packets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use phoenix_gossip::{Agent, Event, Key, Keyring, Status};

mod common;
use common::{config, start, status_of, until};

#[tokio::test]
async fn members_join_see_tags_events_updates_leaves_and_failures() {
    let agents = start((0..5).map(|i| config(&format!("n{i}"), i)).collect()).await;
    for agent in &agents {
        let members = until(agent, "all five alive", |m| {
            m.len() == 5 && m.iter().all(|m| m.status == Status::Alive)
        })
        .await;
        let n3 = members.iter().find(|m| m.name == "n3").unwrap();
        assert_eq!(n3.tags["role"], "role-3");
    }

    // A user event reaches every agent once.
    let mut streams: Vec<_> = agents.iter().map(Agent::subscribe).collect();
    let ltime = agents[2].event("deploy", b"v2", false).await.unwrap();
    for stream in &mut streams {
        let event = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Event::User(event) = stream.recv().await.unwrap() {
                    return event;
                }
            }
        })
        .await
        .expect("the event arrives");
        assert_eq!(
            (event.name.as_str(), &event.payload[..], event.ltime),
            ("deploy", &b"v2"[..], ltime)
        );
    }
    // Events past the size limit are refused before they cost the cluster anything.
    let too_big = vec![0u8; 600];
    assert!(agents[0].event("big", &too_big, false).await.is_err());
    // The clock moved everywhere: a later event from elsewhere has a later time.
    assert!(agents[4].event("next", b"", true).await.unwrap() > ltime);

    // Tags change at runtime.
    agents[1]
        .set_tags(BTreeMap::from([("role".to_string(), "db".to_string())]))
        .await
        .unwrap();
    // Tags ride in every packet: past 512 bytes they are refused.
    let huge = BTreeMap::from([("notes".to_string(), "x".repeat(600))]);
    assert!(matches!(
        agents[1].set_tags(huge).await,
        Err(phoenix_gossip::GossipError::TagsTooLarge(_))
    ));
    until(&agents[0], "n1's new tag", |m| {
        m.iter()
            .any(|m| m.name == "n1" && m.tags.get("role").map(String::as_str) == Some("db"))
    })
    .await;

    // A graceful leave is `left`; a crash is `failed`.
    agents[3].leave().await.unwrap();
    let mut agents = agents;
    let crashed = agents.pop().unwrap();
    drop(crashed);
    for agent in &agents[..3] {
        until(agent, "n3 left and n4 failed", |m| {
            status_of(m, "n3") == Some(Status::Left) && status_of(m, "n4") == Some(Status::Failed)
        })
        .await;
    }
}

#[tokio::test]
async fn an_encrypted_cluster_refuses_wrong_keys_and_survives_garbage() {
    let key = Key::from_bytes(vec![7; 32]).unwrap();
    let keyed = |name: &str, seed| {
        let mut config = config(name, seed);
        config.keyring = Some(Keyring::new(key.clone()));
        config
    };
    let agents = start(vec![keyed("a", 1), keyed("b", 2), keyed("c", 3)]).await;
    until(&agents[2], "three alive", |m| m.len() == 3).await;

    let mut wrong = config("intruder", 4);
    wrong.keyring = Some(Keyring::new(Key::from_bytes(vec![8; 32]).unwrap()));
    let intruder = Agent::start(wrong).await.unwrap();
    assert!(
        !intruder
            .join(agents[0].local_addr(), Duration::from_millis(700))
            .await
            .unwrap()
    );
    let plain = Agent::start(config("plain", 5)).await.unwrap();
    assert!(
        !plain
            .join(agents[0].local_addr(), Duration::from_millis(700))
            .await
            .unwrap()
    );

    // Garbage straight at the socket: dropped and counted, never fatal.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target: SocketAddr = agents[0].local_addr();
    let mut seed = 0x1234_5678_9abc_def0u64;
    for len in 0..300 {
        let junk = phoenix_gossip::fuzzing::junk(&mut seed, len);
        socket.send_to(&junk, target).unwrap();
        // Paced, so the kernel's receive buffer never overflows: every packet must be seen.
        if len % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    socket.send_to(&[0xF1; 40], target).unwrap();
    let dropped = || {
        agents[0]
            .stats()
            .packets_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let members = until(&agents[0], "still three alive", |m| {
        m.len() == 3 && m.iter().all(|m| m.status == Status::Alive)
    })
    .await;
    assert!(
        members
            .iter()
            .all(|m| m.name != "intruder" && m.name != "plain")
    );
    // Wait for the junk to be read, then check it was counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dropped() < 301 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped only {}",
            dropped()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still gossiping: an event still goes round.
    let mut stream = agents[2].subscribe();
    agents[0].event("after-junk", b"", false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(stream.recv().await, Ok(Event::User(e)) if e.name == "after-junk") {}
    })
    .await
    .expect("events still arrive");
}

#[tokio::test]
async fn user_events_past_the_rate_limit_are_refused() {
    let mut limited = config("limited", 9);
    limited.event_rate = (1.0, 3);
    let agent = Agent::start(limited).await.unwrap();
    for _ in 0..3 {
        agent.event("burst", b"", false).await.unwrap();
    }
    let refused = agent.event("burst", b"", false).await.unwrap_err();
    assert!(
        matches!(refused, phoenix_gossip::GossipError::RateLimited),
        "{refused}"
    );
}

#[tokio::test]
async fn a_restarted_agent_rejoins_from_its_snapshot_unless_it_left() {
    let dir = std::env::temp_dir().join(format!("phoenix-rejoin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snapshot = dir.join("c.snapshot");
    let agents = start(vec![config("a", 1), config("b", 2)]).await;
    let with_snapshot = |seed| {
        let mut c = config("c", seed);
        c.snapshot = Some(snapshot.clone());
        c
    };
    let c = Agent::start(with_snapshot(3)).await.unwrap();
    assert!(
        c.join(agents[0].local_addr(), Duration::from_secs(5))
            .await
            .unwrap()
    );
    until(&c, "c sees a and b", |m| m.len() == 3).await;
    // The snapshot is written within a second of the change.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&snapshot)
        .unwrap_or_default()
        .contains("alive: a ")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    until(&agents[0], "c failed", |m| {
        status_of(m, "c") == Some(Status::Failed)
    })
    .await;

    // Restarted with no --join: back through the snapshot.
    let c = Agent::start(with_snapshot(4)).await.unwrap();
    until(&agents[0], "c alive again", |m| {
        status_of(m, "c") == Some(Status::Alive)
    })
    .await;

    // After a graceful leave it stays out.
    c.leave().await.unwrap();
    until(&agents[0], "c left", |m| {
        status_of(m, "c") == Some(Status::Left)
    })
    .await;
    assert!(
        std::fs::read_to_string(&snapshot)
            .unwrap()
            .contains("\nleave\n")
    );
    let c = Agent::start(with_snapshot(5)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.members().await.unwrap().len(),
        1,
        "a left agent does not rejoin by itself"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The user events an agent's stream delivers within `patience`.
async fn user_events(
    stream: &mut tokio::sync::broadcast::Receiver<Event>,
    patience: Duration,
) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(patience, async {
        loop {
            if let Ok(Event::User(event)) = stream.recv().await {
                seen.push((event.name.clone(), event.ltime));
            }
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn a_join_with_replay_delivers_the_events_the_member_remembers() {
    let mut agents = start(vec![config("a", 1), config("x", 4)]).await;
    let (a, x) = (agents.remove(0), agents.remove(0));
    let mut x_events = x.subscribe();
    let first = a.event("deploy", b"v1", true).await.unwrap();
    let second = a.event("restart", b"", false).await.unwrap();
    // x has them, and they are no longer gossiped (their retransmissions are spent).
    assert_eq!(
        user_events(&mut x_events, Duration::from_secs(3))
            .await
            .len(),
        2
    );
    // b joins and asks for a replay: both events, with their times; c joins plainly: none.
    let b = Agent::start(config("b", 2)).await.unwrap();
    let mut b_events = b.subscribe();
    assert!(
        b.join(a.local_addr(), Duration::from_secs(5))
            .await
            .unwrap()
    );
    b.replay_from(a.local_addr()).await.unwrap();
    let c = Agent::start(config("c", 3)).await.unwrap();
    let mut c_events = c.subscribe();
    assert!(
        c.join(a.local_addr(), Duration::from_secs(5))
            .await
            .unwrap()
    );
    let replayed = user_events(&mut b_events, Duration::from_secs(2)).await;
    assert_eq!(
        replayed,
        [
            ("deploy".to_string(), first),
            ("restart".to_string(), second)
        ]
    );
    assert_eq!(
        user_events(&mut c_events, Duration::from_millis(500)).await,
        []
    );
    // Asked again, nothing is delivered twice.
    b.replay_from(a.local_addr()).await.unwrap();
    assert_eq!(
        user_events(&mut b_events, Duration::from_millis(500)).await,
        []
    );
}
