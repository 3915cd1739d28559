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

/// A faulty network for agents: each agent advertises a UDP relay in front of its socket, so
/// every packet to it passes through the relay, which drops or delays what the test says.
/// Senders are told apart by their socket's address.
#[derive(Clone, Default)]
pub struct Network {
    rules: std::sync::Arc<std::sync::Mutex<Rules>>,
}

#[derive(Default)]
struct Rules {
    /// Agent name by the address its packets come from.
    names: std::collections::HashMap<std::net::SocketAddr, String>,
    /// The relay's address (what others reach it at) by agent name.
    relays: std::collections::HashMap<String, std::net::SocketAddr>,
    /// Pairs (from, to) whose packets are dropped.
    blocked: std::collections::HashSet<(String, String)>,
    /// Delay of every packet to an agent.
    delay: std::collections::HashMap<String, Duration>,
}

impl Network {
    /// Starts an agent behind its relay.
    pub async fn start(&self, mut config: AgentConfig) -> Agent {
        let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        config.advertise = Some(relay.local_addr().unwrap());
        let name = config.node.clone();
        let agent = Agent::start(config).await.unwrap();
        let target = agent.local_addr();
        {
            let mut rules = self.rules.lock().unwrap();
            rules.names.insert(target, name.clone());
            rules
                .relays
                .insert(name.clone(), relay.local_addr().unwrap());
        }
        let rules = self.rules.clone();
        let relay = std::sync::Arc::new(relay);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = relay.recv_from(&mut buf).await {
                let (blocked, delay) = {
                    let rules = rules.lock().unwrap();
                    let sender = rules.names.get(&from).cloned().unwrap_or_default();
                    (
                        rules.blocked.contains(&(sender, name.clone())),
                        rules.delay.get(&name).copied(),
                    )
                };
                if blocked {
                    continue;
                }
                let packet = buf[..len].to_vec();
                let relay = relay.clone();
                match delay {
                    Some(delay) => {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = relay.send_to(&packet, target).await;
                        });
                    }
                    None => {
                        let _ = relay.send_to(&packet, target).await;
                    }
                }
            }
        });
        agent
    }

    /// Where others reach `agent`.
    pub fn addr_of(&self, agent: &Agent) -> std::net::SocketAddr {
        self.rules.lock().unwrap().relays[agent.name()]
    }

    /// Starts agents behind relays; each joins through the first.
    pub async fn start_all(&self, configs: Vec<AgentConfig>) -> Vec<Agent> {
        let mut agents: Vec<Agent> = Vec::new();
        for config in configs {
            let agent = self.start(config).await;
            if let Some(first) = agents.first() {
                let joined = agent
                    .join(self.addr_of(first), Duration::from_secs(5))
                    .await
                    .unwrap();
                assert!(joined, "{} joins", agent.name());
            }
            agents.push(agent);
        }
        agents
    }

    /// Drops every packet between the two groups, both ways.
    pub fn partition(&self, left: &[&Agent], right: &[&Agent]) {
        let mut rules = self.rules.lock().unwrap();
        for a in left {
            for b in right {
                rules
                    .blocked
                    .insert((a.name().to_string(), b.name().to_string()));
                rules
                    .blocked
                    .insert((b.name().to_string(), a.name().to_string()));
            }
        }
    }

    pub fn heal(&self) {
        self.rules.lock().unwrap().blocked.clear();
    }

    /// Holds every packet to `agent` this long, as a starved or paused host would.
    pub fn delay_to(&self, agent: &Agent, delay: Duration) {
        self.rules
            .lock()
            .unwrap()
            .delay
            .insert(agent.name().to_string(), delay);
    }
}
