//! Agents on a faulty network (every packet to an agent passes a relay the test controls):
//! partition and heal, a slow member, and fifty agents in one cluster.

use std::time::Duration;

use phoenix_gossip::{Agent, AgentConfig, Event, Status};

mod common;
use common::{Network, config, start, status_of, until};

/// Test timings, and failed members are announced to every 500 ms, so a healed partition
/// merges within a second or two (Serf reconnects every 30 s by default).
fn reconnecting(name: &str, seed: u64) -> AgentConfig {
    let mut config = config(name, seed);
    config.reconnect_interval = Duration::from_millis(500);
    config
}

fn names(agents: &[&Agent]) -> Vec<String> {
    agents.iter().map(|a| a.name().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_seen_as_failures_on_both_sides_and_heals() {
    let network = Network::default();
    let configs = ["l0", "l1", "l2", "r0", "r1", "r2"]
        .iter()
        .enumerate()
        .map(|(i, name)| reconnecting(name, i as u64))
        .collect();
    let agents = network.start_all(configs).await;
    for agent in &agents {
        until(agent, "six alive", |m| {
            m.len() == 6 && m.iter().all(|m| m.status == Status::Alive)
        })
        .await;
    }
    let (left, right): (Vec<&Agent>, Vec<&Agent>) =
        agents.iter().partition(|a| a.name().starts_with('l'));
    network.partition(&left, &right);
    for (side, other) in [(&left, names(&right)), (&right, names(&left))] {
        for agent in side.iter() {
            until(agent, "the other side failed, its own alive", |m| {
                m.iter().all(|m| {
                    let expected = if other.contains(&m.name) {
                        Status::Failed
                    } else {
                        Status::Alive
                    };
                    m.status == expected
                })
            })
            .await;
        }
    }
    // Each side still works on its own: an event goes round its half only.
    let mut on_left = left[2].subscribe();
    let mut on_right = right[0].subscribe();
    left[0].event("left-only", b"", false).await.unwrap();
    let heard = |stream: &mut tokio::sync::broadcast::Receiver<Event>| {
        std::iter::from_fn(|| stream.try_recv().ok())
            .any(|e| matches!(e, Event::User(u) if u.name == "left-only"))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(heard(&mut on_left));
    assert!(!heard(&mut on_right), "nothing crosses the partition");

    network.heal();
    for agent in &agents {
        until(agent, "everyone alive again after the heal", |m| {
            m.len() == 6 && m.iter().all(|m| m.status == Status::Alive)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_notices_it_is_slow_and_accuses_nobody() {
    let network = Network::default();
    let configs = (0..5).map(|i| config(&format!("s{i}"), i)).collect();
    let agents = network.start_all(configs).await;
    for agent in &agents {
        until(agent, "five alive", |m| m.len() == 5).await;
    }
    let mut watchers: Vec<_> = agents.iter().map(Agent::subscribe).collect();
    // Everything sent to s4 arrives 500 ms late: longer than two probe periods (200 ms
    // each), so its probes time out until its score stretches the period past the delay.
    let slow = &agents[4];
    network.delay_to(slow, Duration::from_millis(500));
    let score = |agent: &Agent| {
        agent
            .stats()
            .health_score
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Scores sampled every 50 ms for 8 s.
    let mut sums = [0u64; 5];
    let mut highest = 0;
    for _ in 0..160 {
        for (sum, agent) in sums.iter_mut().zip(&agents) {
            *sum += score(agent);
        }
        highest = highest.max(score(slow));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let means: Vec<f64> = sums.iter().map(|s| *s as f64 / 160.0).collect();
    eprintln!("mean health scores (s0..s4, s4 slow): {means:?}");
    assert!(
        highest >= 2,
        "the slow member knows it is slow (score {highest})"
    );
    // Healthy members' probes of the slow one time out too, now and then; their own
    // score stays far lower.
    for (agent, sum) in agents[..4].iter().zip(&sums) {
        assert!(
            sums[4] > 3 * sum,
            "{}'s mean score {} against the slow member's {}",
            agent.name(),
            *sum as f64 / 160.0,
            sums[4] as f64 / 160.0
        );
    }
    // No healthy member is declared failed, by anyone: the slow one, whose probes all time
    // out, waits longer before it accuses (it may itself be suspected, and refutes).
    let mut slow_failed = 0;
    for (agent, watcher) in agents.iter().zip(&mut watchers) {
        let failed: Vec<String> = std::iter::from_fn(|| watcher.try_recv().ok())
            .filter_map(|e| match e {
                Event::MemberFailed(m) => Some(m.name),
                _ => None,
            })
            .filter(|name| {
                slow_failed += usize::from(name == "s4");
                name != "s4"
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{} declared {failed:?} failed",
            agent.name()
        );
    }
    eprintln!("the slow member was declared failed {slow_failed} times");
    // Back to normal: the score falls again.
    network.delay_to(slow, Duration::ZERO);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while score(slow) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "score {}",
            score(slow)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_converge_hear_an_event_and_see_a_failure() {
    let mut agents = start((0..50).map(|i| config(&format!("m{i:02}"), i)).collect()).await;
    for agent in &agents {
        until(agent, "fifty alive", |m| {
            m.len() == 50 && m.iter().all(|m| m.status == Status::Alive)
        })
        .await;
    }
    let mut streams: Vec<_> = agents.iter().map(Agent::subscribe).collect();
    agents[17].event("fifty", b"", false).await.unwrap();
    for (agent, stream) in agents.iter().zip(&mut streams) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(stream.recv().await, Ok(Event::User(e)) if e.name == "fifty") {}
        })
        .await
        .unwrap_or_else(|_| panic!("{} hears the event", agent.name()));
    }
    drop(agents.remove(33));
    for agent in &agents {
        until(agent, "m33 failed", |m| {
            status_of(m, "m33") == Some(Status::Failed)
        })
        .await;
    }
}
