//! Helpers shared by the gossip integration tests: agents on loopback with SWIM timings
//! scaled down so a test sees failures in about a second.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use phoenix_gossip::{Agent, AgentConfig, Member, Status};

/// SWIM timings scaled down so a test sees failures in about a second.
pub fn config(name: &str, seed: u64) -> AgentConfig {
    let mut config = AgentConfig::new(name, "127.0.0.1:0".parse().unwrap());
    config.seed = seed;
    config.swim.probe_period = Duration::from_millis(200);
    config.swim.probe_rtt = Duration::from_millis(80);
    config.swim.suspect_to_down_after = Duration::from_millis(800);
    config.tags = BTreeMap::from([("role".to_string(), format!("role-{seed}"))]);
    config
}

pub async fn start(configs: Vec<AgentConfig>) -> Vec<Agent> {
    let mut agents = Vec::new();
    for config in configs {
        let agent = Agent::start(config).await.unwrap();
        if let Some(first) = agents.first() {
            let first: &Agent = first;
            assert!(
                agent
                    .join(first.local_addr(), Duration::from_secs(5))
                    .await
                    .unwrap(),
                "{} joins",
                agent.name()
            );
        }
        agents.push(agent);
    }
    agents
}

/// Waits (up to 10 s) until `agent` lists members that satisfy `check`.
pub async fn until(agent: &Agent, what: &str, check: impl Fn(&[Member]) -> bool) -> Vec<Member> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let members = agent.members().await.unwrap();
        if check(&members) {
            return members;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {what}; members: {members:?}",
            agent.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn status_of(members: &[Member], name: &str) -> Option<Status> {
    members.iter().find(|m| m.name == name).map(|m| m.status)
}
