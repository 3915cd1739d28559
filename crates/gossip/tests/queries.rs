//! Queries, cluster-wide keyring changes and force-leave between real agents on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use phoenix_gossip::{
    Agent, Event, GossipError, Key, KeyOp, Keyring, QueryHandle, QueryParams, QueryReply, Status,
};

mod common;
use common::{config, start, status_of, until};

/// Answers every query this agent receives with `NAME:PAYLOAD`.
fn answer_queries(agent: &Agent) {
    let mut events = agent.subscribe();
    let agent = agent.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Event::Query(query) = event {
                let mut answer = format!("{}:", agent.name()).into_bytes();
                answer.extend_from_slice(&query.payload);
                agent.respond(query.id, answer).await.unwrap();
                // A second answer is refused.
                let again = agent.respond(query.id, b"twice".to_vec()).await;
                assert!(matches!(again, Err(GossipError::AlreadyResponded(_))));
            }
        }
    });
}

/// Everything a query brought back before its deadline.
async fn collect(mut handle: QueryHandle) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let (mut acks, mut responses) = (BTreeSet::new(), BTreeMap::new());
    let limit = handle.timeout + Duration::from_secs(2);
    tokio::time::timeout(limit, async {
        while let Some(reply) = handle.next().await {
            match reply {
                QueryReply::Ack(from) => assert!(acks.insert(from), "one ack per member"),
                QueryReply::Response(from, payload) => {
                    let text = String::from_utf8(payload).unwrap();
                    assert!(
                        responses.insert(from, text).is_none(),
                        "one response per member"
                    );
                }
            }
        }
    })
    .await
    .expect("the query closes at its deadline");
    (acks, responses)
}

fn params(name: &str, payload: &str) -> QueryParams {
    QueryParams {
        name: name.into(),
        payload: payload.as_bytes().to_vec(),
        ack: true,
        timeout: Some(Duration::from_millis(1500)),
        ..QueryParams::default()
    }
}

#[tokio::test]
async fn queries_collect_acks_and_answers_from_the_members_they_ask() {
    let agents = start((0..5).map(|i| config(&format!("q{i}"), i)).collect()).await;
    for agent in &agents {
        until(agent, "five alive", |m| m.len() == 5).await;
        answer_queries(agent);
    }
    let everyone: BTreeSet<String> = (0..5).map(|i| format!("q{i}")).collect();

    // Everyone acks and answers, the asker included.
    let (acks, responses) = collect(agents[1].query(params("uptime", "x")).await.unwrap()).await;
    assert_eq!(acks, everyone);
    assert_eq!(responses.keys().cloned().collect::<BTreeSet<_>>(), everyone);
    assert_eq!(responses["q3"], "q3:x");

    // Tag and node filters pick who answers.
    let mut by_tag = params("uptime", "t");
    by_tag.filter_tags = BTreeMap::from([("role".to_string(), "role-2".to_string())]);
    let (acks, responses) = collect(agents[0].query(by_tag).await.unwrap()).await;
    assert_eq!(acks, BTreeSet::from(["q2".to_string()]));
    assert_eq!(responses.len(), 1);
    let mut by_node = params("uptime", "n");
    by_node.filter_nodes = vec!["q4".into(), "q0".into()];
    by_node.ack = false;
    let (acks, responses) = collect(agents[2].query(by_node).await.unwrap()).await;
    assert!(acks.is_empty(), "no acks unless asked");
    assert_eq!(
        responses.keys().cloned().collect::<Vec<_>>(),
        vec!["q0".to_string(), "q4".to_string()]
    );

    // Relayed answers still count once per member.
    let mut relayed = params("uptime", "r");
    relayed.relay_factor = 2;
    let (_, responses) = collect(agents[3].query(relayed).await.unwrap()).await;
    assert_eq!(responses.len(), 5);

    // Limits: size, and queries per second.
    let too_big = params("big", &"x".repeat(2000));
    assert!(matches!(
        agents[0].query(too_big).await,
        Err(GossipError::QueryTooLarge(_))
    ));
    let mut limited = config("limited", 9);
    limited.query_rate = (1.0, 2);
    let limited = Agent::start(limited).await.unwrap();
    for _ in 0..2 {
        limited.query(params("q", "")).await.unwrap();
    }
    assert!(matches!(
        limited.query(params("q", "")).await,
        Err(GossipError::RateLimited)
    ));
}

#[tokio::test]
async fn an_answer_after_the_deadline_is_refused() {
    let agents = start(vec![config("a", 1), config("b", 2)]).await;
    until(&agents[0], "two alive", |m| m.len() == 2).await;
    let mut events = agents[1].subscribe();
    let mut quick = params("slow", "");
    quick.timeout = Some(Duration::from_millis(300));
    let handle = agents[0].query(quick).await.unwrap();
    let query = loop {
        if let Event::Query(query) = events.recv().await.unwrap() {
            break query;
        }
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let late = agents[1].respond(query.id, b"late".to_vec()).await;
    assert!(
        matches!(late, Err(GossipError::PastDeadline(_))),
        "{late:?}"
    );
    let (acks, responses) = collect(handle).await;
    assert_eq!(acks.len(), 2);
    assert!(responses.is_empty());
    assert!(matches!(
        agents[1].respond(9999, Vec::new()).await,
        Err(GossipError::UnknownQuery(9999))
    ));
}

#[tokio::test]
async fn keys_rotate_on_every_member_without_losing_the_cluster() {
    let old = Key::from_bytes(vec![1; 32]).unwrap();
    let new = Key::from_bytes(vec![2; 16]).unwrap();
    let keyed = |name: &str, seed| {
        let mut config = config(name, seed);
        config.keyring = Some(Keyring::new(old.clone()));
        config
    };
    let agents = start(vec![keyed("a", 1), keyed("b", 2), keyed("c", 3)]).await;
    until(&agents[2], "three alive", |m| m.len() == 3).await;

    for op in [
        KeyOp::Install(new.clone()),
        KeyOp::Use(new.clone()),
        KeyOp::Remove(old.clone()),
    ] {
        let report = agents[0].change_keys_everywhere(op.clone()).await.unwrap();
        assert_eq!(report.members, 3);
        assert_eq!(report.answers.len(), 3, "{op:?}: {report:?}");
        assert_eq!(report.errors().count(), 0, "{op:?}: {report:?}");
    }
    // Every member holds only the new key now, and the cluster still talks.
    for agent in &agents {
        assert_eq!(
            agent.keys(KeyOp::List).await.unwrap(),
            vec![new.to_base64()]
        );
    }
    let report = agents[1].change_keys_everywhere(KeyOp::List).await.unwrap();
    assert_eq!(report.key_counts(), BTreeMap::from([(new.to_base64(), 3)]));
    // Removing the key in use is refused everywhere, and says so per member.
    let report = agents[1]
        .change_keys_everywhere(KeyOp::Remove(new.clone()))
        .await
        .unwrap();
    assert_eq!(report.errors().count(), 3, "{report:?}");
    let mut stream = agents[2].subscribe();
    agents[0].event("after-rotation", b"", false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(stream.recv().await, Ok(Event::User(e)) if e.name == "after-rotation") {}
    })
    .await
    .expect("events still arrive under the new key");
    // A member still on the old key alone is shut out.
    let stale = Agent::start(keyed("stale", 4)).await.unwrap();
    assert!(
        !stale
            .join(agents[0].local_addr(), Duration::from_millis(700))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn force_leave_turns_a_failed_member_into_a_left_one_everywhere_or_prunes_it() {
    let mut agents = start((0..4).map(|i| config(&format!("f{i}"), i)).collect()).await;
    until(&agents[0], "four alive", |m| m.len() == 4).await;
    let before = agents[0].event("before", b"", false).await.unwrap();
    // An alive member ignores the intent.
    agents[0].force_leave("f1", false).await.unwrap();
    assert!(matches!(
        agents[0].force_leave("nobody", false).await,
        Err(GossipError::UnknownMember(_))
    ));
    drop(agents.pop());
    drop(agents.pop());
    for agent in &agents {
        until(agent, "f2 and f3 failed", |m| {
            status_of(m, "f2") == Some(Status::Failed) && status_of(m, "f3") == Some(Status::Failed)
        })
        .await;
    }
    agents[0].force_leave("f2", false).await.unwrap();
    agents[1].force_leave("f3", true).await.unwrap();
    for agent in &agents {
        until(agent, "f2 left, f3 forgotten", |m| {
            status_of(m, "f2") == Some(Status::Left) && status_of(m, "f3").is_none()
        })
        .await;
    }
    // Intents count on Serf's member clock: the user events' clock did not move.
    let after = agents[0].event("after", b"", false).await.unwrap();
    assert_eq!(after, before + 1);
}
