//! `phoenix agent` and the commands that talk to a running agent over its RPC address
//! (Serf's protocol: the stock `serf` CLI works against the same address).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use phoenix_gossip::coalesce::{Batch, Coalescer};
use phoenix_gossip::rpc::{self, Client, EventFilter, KeyRequest, KeyResponse, MembersResponse};
use phoenix_gossip::{Agent, AgentConfig, Key, Keyring};
use tokio::io::AsyncWriteExt;

/// Serf's default RPC address.
const DEFAULT_RPC: &str = "127.0.0.1:7373";

#[derive(Args)]
pub struct AgentArgs {
    /// This node's name, unique in the cluster (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Gossip address to bind (UDP).
    #[arg(long, default_value = "127.0.0.1:7946")]
    bind: SocketAddr,
    /// Address others reach this agent at (default: the bound address).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Join the cluster through this agent; repeatable; retried until one answers.
    #[arg(long = "join")]
    join: Vec<String>,
    /// A tag KEY=VALUE; repeatable.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    /// Run SCRIPT on events: `[TYPE=]SCRIPT` with TYPE as in Serf (`member-join`, `user:deploy`,
    /// a comma list…); repeatable. Handlers get Serf's environment and stdin.
    #[arg(long = "event-handler")]
    handlers: Vec<String>,
    /// Encrypt gossip with this base64 AES key (16, 24 or 32 bytes, as `serf keygen` prints).
    #[arg(long)]
    encrypt: Option<String>,
    /// Keep members and the event clock here, to rejoin by itself after a restart (unless it
    /// left gracefully).
    #[arg(long)]
    snapshot: Option<std::path::PathBuf>,
    /// Address of the RPC (Serf's protocol).
    #[arg(long, default_value = DEFAULT_RPC)]
    rpc_addr: SocketAddr,
    /// Require this token from RPC clients (needed to bind the RPC beyond loopback).
    #[arg(long)]
    rpc_auth: Option<String>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    if !args.rpc_addr.ip().is_loopback() && args.rpc_auth.is_none() {
        bail!(
            "--rpc-addr {} is not loopback: give --rpc-auth TOKEN",
            args.rpc_addr
        );
    }
    let node = match args.node {
        Some(node) => node,
        None => hostname(),
    };
    let mut config = AgentConfig::new(node.clone(), args.bind);
    config.advertise = args.advertise;
    config.tags = args.tags.into_iter().collect();
    config.seed = std::process::id() as u64 ^ now_nanos();
    config.snapshot = args.snapshot;
    if let Some(key) = &args.encrypt {
        let key = Key::from_base64(key).context("--encrypt")?;
        config.keyring = Some(Keyring::new(key));
    }
    let handlers = args
        .handlers
        .iter()
        .map(|spec| Handler::parse(spec))
        .collect::<Result<Vec<_>>>()?;
    let agent = Agent::start(config).await?;
    let listener = tokio::net::TcpListener::bind(args.rpc_addr)
        .await
        .with_context(|| format!("bind the RPC address {}", args.rpc_addr))?;
    eprintln!(
        "phoenix agent: node {node}, gossip {}, RPC {}",
        agent.local_addr(),
        listener.local_addr()?
    );
    tokio::spawn(rpc::serve(listener, agent.clone(), args.rpc_auth.clone()));
    if !handlers.is_empty() {
        tokio::spawn(run_handlers(agent.clone(), handlers));
    }
    join_with_retries(&agent, &args.join).await?;
    let mut events = agent.subscribe();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            eprintln!("phoenix agent: leaving the cluster");
            agent.leave().await?;
        }
        _ = async { while events.recv().await.is_ok() {} } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Joins through any of `addresses`, retrying every second for a minute.
async fn join_with_retries(agent: &Agent, addresses: &[String]) -> Result<()> {
    if addresses.is_empty() {
        return Ok(());
    }
    for attempt in 1..=60 {
        for address in addresses {
            let addr = rpc::resolve(address).map_err(|e| anyhow!(e))?;
            if agent.join(addr, Duration::from_secs(1)).await? {
                eprintln!("phoenix agent: joined through {addr}");
                return Ok(());
            }
        }
        tracing::warn!(
            attempt,
            "no member answered at {}; retrying",
            addresses.join(", ")
        );
    }
    bail!(
        "could not join through {} within a minute",
        addresses.join(", ")
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "phoenix".into())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One `--event-handler`.
struct Handler {
    filter: EventFilter,
    script: String,
}

impl Handler {
    fn parse(spec: &str) -> Result<Handler> {
        // `TYPE=SCRIPT` when the part before `=` is a valid filter; else the whole is a script.
        if let Some((kinds, script)) = spec.split_once('=')
            && let Ok(filter) = EventFilter::parse(kinds)
        {
            return Ok(Handler {
                filter,
                script: script.to_string(),
            });
        }
        Ok(Handler {
            filter: EventFilter::parse("*").map_err(|e| anyhow!(e))?,
            script: spec.to_string(),
        })
    }
}

/// Runs handler scripts off the gossip path, with Serf's coalescing (1 s quiet, 3 s at most;
/// user events fired with `--coalesce=false` pass at once). A slow script delays only the
/// handlers, never the agent.
async fn run_handlers(agent: Agent, handlers: Vec<Handler>) {
    let mut events = agent.subscribe();
    let mut coalescer = Coalescer::serf();
    loop {
        let deadline = coalescer.deadline();
        let batches = tokio::select! {
            received = events.recv() => match received {
                Ok(event) => coalescer.push(event, Instant::now()).into_iter().collect(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event handlers fell behind; events skipped");
                    continue;
                }
                Err(_) => return,
            },
            _ = sleep_until(deadline) => coalescer.flush(Instant::now()),
        };
        for batch in batches {
            let Ok(members) = agent.members().await else {
                return;
            };
            let Some(me) = members.into_iter().find(|m| m.name == agent.name()) else {
                continue;
            };
            let (kind, name) = match &batch {
                Batch::User(user) => ("user", Some(user.name.as_str())),
                Batch::Members(kind, _) => (*kind, None),
            };
            for handler in handlers.iter().filter(|h| h.filter.allows(kind, name)) {
                if let Err(error) = invoke(&handler.script, &batch, &me.name, &me.tags).await {
                    tracing::warn!(script = %handler.script, %error, "event handler failed");
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs one handler with Serf's environment (and `PHOENIX_*` aliases) and stdin.
async fn invoke(
    script: &str,
    batch: &Batch,
    self_name: &str,
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    let kind = match batch {
        Batch::User(_) => "user",
        Batch::Members(kind, _) => kind,
    };
    let mut env: Vec<(String, String)> = vec![
        ("SERF_EVENT".into(), kind.into()),
        ("SERF_SELF_NAME".into(), self_name.into()),
        (
            "SERF_SELF_ROLE".into(),
            tags.get("role").cloned().unwrap_or_default(),
        ),
    ];
    for (key, value) in tags {
        env.push((format!("SERF_TAG_{}", key.to_uppercase()), value.clone()));
    }
    let stdin = match batch {
        Batch::User(user) => {
            env.push(("SERF_USER_EVENT".into(), user.name.clone()));
            env.push(("SERF_USER_LTIME".into(), user.ltime.to_string()));
            user.payload.clone()
        }
        // Serf's member lines: name, address, role, tags.
        Batch::Members(_, members) => members
            .iter()
            .map(|member| {
                let tags: Vec<String> = member
                    .tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let role = member.tags.get("role").cloned().unwrap_or_default();
                format!(
                    "{}\t{}\t{}\t{}\n",
                    member.name,
                    member.addr.ip(),
                    role,
                    tags.join(",")
                )
            })
            .collect::<String>()
            .into_bytes(),
    };
    let aliases: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.replacen("SERF_", "PHOENIX_", 1), v.clone()))
        .collect();
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .envs(env.into_iter().chain(aliases))
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {script}"))?;
    if let Some(mut input) = child.stdin.take() {
        // A handler that does not read its stdin is fine.
        let _ = input.write_all(&stdin).await;
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!("{script} exited with {status}");
    }
    Ok(())
}

#[derive(Args)]
pub struct RpcArgs {
    /// The agent's RPC address.
    #[arg(long, default_value = DEFAULT_RPC, env = "SERF_RPC_ADDR")]
    rpc_addr: SocketAddr,
    /// RPC token, when the agent requires one.
    #[arg(long, env = "SERF_RPC_AUTH")]
    rpc_auth: Option<String>,
}

impl RpcArgs {
    async fn client(&self) -> Result<Client> {
        Client::connect(self.rpc_addr, self.rpc_auth.as_deref())
            .await
            .map_err(|e| anyhow!(e))
    }
}

#[derive(Args)]
pub struct MembersArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Only members with this status (alive, suspect, failed, left).
    #[arg(long)]
    status: Option<String>,
    /// Only members with this tag KEY=VALUE (`*` matches any run of characters); repeatable.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    #[arg(long)]
    json: bool,
}

pub async fn members(args: MembersArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client().await?;
    let request = rpc::MembersFilteredRequest {
        tags: args.tags.into_iter().collect(),
        status: args.status.unwrap_or_default(),
        name: String::new(),
    };
    let response: MembersResponse = client
        .call("members-filtered", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    if args.json {
        let members: Vec<serde_json::Value> = response
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "addr": address(m), "status": m.status, "tags": m.tags,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(ExitCode::SUCCESS);
    }
    for member in &response.members {
        let tags: Vec<String> = member
            .tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<20} {:<22} {:<8} {}",
            member.name,
            address(member),
            member.status,
            tags.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn address(member: &rpc::RpcMember) -> String {
    let ip: std::net::IpAddr = match member.addr.len() {
        4 => <[u8; 4]>::try_from(&member.addr[..])
            .map(Into::into)
            .unwrap_or([0; 4].into()),
        _ => <[u8; 16]>::try_from(&member.addr[..])
            .map(Into::into)
            .unwrap_or([0; 16].into()),
    };
    SocketAddr::new(ip, member.port).to_string()
}

#[derive(Args)]
pub struct EventArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Let agents coalesce this event with others of the same name.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    coalesce: bool,
    name: String,
    payload: Option<String>,
}

pub async fn event(args: EventArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client().await?;
    let request = rpc::EventRequest {
        name: args.name.clone(),
        payload: args.payload.unwrap_or_default().into_bytes(),
        coalesce: args.coalesce,
    };
    client
        .call::<()>("event", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    println!(
        "Event '{}' dispatched! Coalescing enabled: {}",
        args.name, args.coalesce
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct JoinArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    #[arg(required = true)]
    addresses: Vec<String>,
}

pub async fn join(args: JoinArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client().await?;
    let request = rpc::JoinRequest {
        existing: args.addresses,
        replay: false,
    };
    let response: rpc::JoinResponse = client
        .call("join", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    println!(
        "Successfully joined cluster by contacting {} nodes.",
        response.num
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn leave(args: RpcArgs) -> Result<ExitCode> {
    let mut client = args.client().await?;
    client
        .call::<()>("leave", None)
        .await
        .map_err(|e| anyhow!(e))?;
    println!("Graceful leave complete");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct TagsArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Set a tag KEY=VALUE; repeatable.
    #[arg(long = "set", value_parser = key_value)]
    set: Vec<(String, String)>,
    /// Delete a tag; repeatable.
    #[arg(long = "delete")]
    delete: Vec<String>,
}

pub async fn tags(args: TagsArgs) -> Result<ExitCode> {
    if args.set.is_empty() && args.delete.is_empty() {
        bail!("give --set KEY=VALUE or --delete KEY");
    }
    let mut client = args.rpc.client().await?;
    let request = rpc::TagsRequest {
        tags: args.set.into_iter().collect(),
        delete_tags: args.delete,
    };
    client
        .call::<()>("tags", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    println!("Successfully updated agent tags");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct KeysArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    #[arg(long, conflicts_with_all = ["use_key", "remove", "list"])]
    install: Option<String>,
    #[arg(long = "use", conflicts_with_all = ["remove", "list"])]
    use_key: Option<String>,
    #[arg(long, conflicts_with = "list")]
    remove: Option<String>,
    #[arg(long)]
    list: bool,
}

pub async fn keys(args: KeysArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client().await?;
    let (command, key) = match (args.install, args.use_key, args.remove) {
        (Some(key), _, _) => ("install-key", Some(key)),
        (_, Some(key), _) => ("use-key", Some(key)),
        (_, _, Some(key)) => ("remove-key", Some(key)),
        _ if args.list => ("list-keys", None),
        _ => bail!("give --install, --use, --remove or --list"),
    };
    let request = key.map(|key| KeyRequest { key });
    let response: KeyResponse = match &request {
        Some(request) => client.call(command, Some(request)).await,
        None => client.call(command, None).await,
    }
    .map_err(|e| anyhow!(e))?;
    for key in response.keys.keys() {
        println!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn monitor(args: RpcArgs) -> Result<ExitCode> {
    let mut client = args.client().await?;
    let seq = client
        .send(
            "monitor",
            Some(&rpc::MonitorRequest {
                log_level: "INFO".into(),
            }),
        )
        .await
        .map_err(|e| anyhow!(e))?;
    let ack: rpc::ResponseHeader = client.read().await.map_err(|e| anyhow!(e))?;
    if !ack.error.is_empty() {
        bail!(ack.error);
    }
    loop {
        let header: rpc::ResponseHeader = client.read().await.map_err(|e| anyhow!(e))?;
        let record: rpc::LogRecord = client.read().await.map_err(|e| anyhow!(e))?;
        if header.seq == seq {
            println!("{}", record.log);
        }
    }
}
