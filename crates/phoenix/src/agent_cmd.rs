//! `phoenix agent` and the commands that talk to a running agent over its RPC address
//! (Serf's protocol: the stock `serf` CLI works against the same address).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use phoenix_fleet::AgentSettings;
use phoenix_fleet::config::{SerfAgent, SerfConfig};
use phoenix_gossip::Agent;
use phoenix_gossip::rpc::{self, Client, KeyRequest, KeyResponse, MembersResponse};

use crate::handlers::{self, Handler};

/// Serf's default RPC address.
const DEFAULT_RPC: &str = "127.0.0.1:7373";

/// `phoenix agent`: Serf's flags (one dash or two) and its JSON configuration files.
#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub log: crate::LogArgs,
    /// Serf's JSON configuration: a file, or a directory whose `*.json` files are read in
    /// lexical order; repeatable, read in the order given; flags override them.
    #[arg(
        long = "config-file",
        visible_alias = "config-dir",
        value_name = "PATH"
    )]
    config: Vec<PathBuf>,
    /// This node's name, unique in the cluster (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Serf's old single role: the tag `role`.
    #[arg(long)]
    role: Option<String>,
    /// Gossip address to bind: IP[:PORT], port 7946 by default [default: 127.0.0.1:7946].
    #[arg(long)]
    bind: Option<String>,
    /// Address others reach this agent at (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Bind to this network interface's address.
    #[arg(long)]
    iface: Option<String>,
    /// Join the cluster through this agent at start; repeatable; retried for a minute, then
    /// the agent exits.
    #[arg(long = "join")]
    join: Vec<String>,
    /// Join through this agent at start, retried every --retry-interval until one answers;
    /// repeatable.
    #[arg(long = "retry-join")]
    retry_join: Vec<String>,
    /// Give up --retry-join after this many attempts and exit (0: never give up).
    #[arg(long)]
    retry_max: Option<i64>,
    /// Time between --retry-join attempts [default: 30s].
    #[arg(long, value_parser = any_duration)]
    retry_interval: Option<Duration>,
    /// Replay the user events the agent joined through remembers (its last 64).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    replay: Option<bool>,
    /// Rejoin through the snapshot even after a graceful leave.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    rejoin: Option<bool>,
    /// A tag KEY=VALUE; repeatable.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    /// Keep the tags in this JSON file (Serf's format), changes included, across restarts.
    #[arg(long)]
    tags_file: Option<String>,
    /// Run SCRIPT on events: `[TYPE=]SCRIPT` with TYPE as in Serf (`member-join`, `user:deploy`,
    /// a comma list…); repeatable. Handlers get Serf's environment and stdin.
    #[arg(long = "event-handler")]
    handlers: Vec<String>,
    /// Encrypt gossip with this base64 AES key (16, 24 or 32 bytes, as `serf keygen` prints).
    #[arg(long)]
    encrypt: Option<String>,
    /// Keep the keyring in this JSON file (Serf's format, mode 0600), rotations included.
    #[arg(long)]
    keyring_file: Option<String>,
    /// Keep members and clocks here (Serf's snapshot format), to rejoin by itself after a
    /// restart (unless it left gracefully).
    #[arg(long)]
    snapshot: Option<String>,
    /// Address of the RPC (Serf's protocol) [default: 127.0.0.1:7373].
    #[arg(long)]
    rpc_addr: Option<String>,
    /// Require this token from RPC clients (needed to bind the RPC beyond loopback).
    #[arg(long)]
    rpc_auth: Option<String>,
    /// Serf's log level: trace, debug, info, warn or err (overrides --log).
    #[arg(long)]
    log_level: Option<String>,
    /// Timing profile: lan (default), wan or local.
    #[arg(long)]
    profile: Option<String>,
    /// The gossip wire: `phoenix` (the default, Phoenix's own) or `serf` (memberlist's and
    /// Serf's protocol, to join `serf agent`s). Serf's version numbers are refused.
    #[arg(long)]
    protocol: Option<String>,
    /// mDNS discovery (refused: not supported).
    #[arg(long)]
    discover: Option<String>,
    /// mDNS interface (refused: not supported).
    #[arg(long)]
    mdns_iface: Option<String>,
    /// Log to syslog (refused: the agent logs to stderr).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    syslog: Option<bool>,
    /// Accepted for Serf's sake: Phoenix's messages are compact already.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    disable_compression: Option<bool>,
    /// Accepted for Serf's sake (a leave is gossiped at once, not waited on).
    #[arg(long, value_parser = any_duration)]
    broadcast_timeout: Option<Duration>,
    /// How often to try failed members again, so a healed partition merges [default: 30s].
    #[arg(long, value_parser = any_duration)]
    reconnect_interval: Option<Duration>,
    /// How long failed and left members stay listed before they are forgotten [default: 24h].
    #[arg(long, value_parser = any_duration)]
    reap_after: Option<Duration>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// Go's durations (`1h30m`, as Serf) or Phoenix's (`7d`).
fn any_duration(text: &str) -> Result<Duration, String> {
    phoenix_fleet::config::go_duration(text)
        .or_else(|_| phoenix_fleet::config::parse_duration(text))
}

impl AgentArgs {
    /// The flags, as the last layer of Serf's configuration.
    fn command_line(&self) -> SerfConfig {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let mdns = self
            .mdns_iface
            .as_ref()
            .map(|iface| json!({ "interface": iface }));
        SerfConfig {
            node_name: text(&self.node),
            role: text(&self.role),
            tags: self.tags.iter().cloned().collect(),
            tags_file: text(&self.tags_file),
            bind: text(&self.bind),
            advertise: text(&self.advertise),
            encrypt_key: text(&self.encrypt),
            keyring_file: text(&self.keyring_file),
            log_level: text(&self.log_level),
            rpc_addr: text(&self.rpc_addr),
            rpc_auth: text(&self.rpc_auth),
            protocol: text(&self.protocol),
            replay_on_join: self.replay.unwrap_or(false),
            start_join: self.join.clone(),
            event_handlers: self.handlers.clone(),
            profile: text(&self.profile),
            snapshot_path: text(&self.snapshot),
            discover: text(&self.discover),
            mdns,
            interface: text(&self.iface),
            reconnect_interval: self.reconnect_interval,
            reconnect_timeout: self.reap_after,
            tombstone_timeout: self.reap_after,
            enable_syslog: self.syslog.unwrap_or(false),
            retry_join: self.retry_join.clone(),
            retry_max_attempts: self.retry_max.unwrap_or(0),
            retry_interval: self.retry_interval,
            rejoin_after_leave: self.rejoin.unwrap_or(false),
            enable_compression: !self.disable_compression.unwrap_or(false),
            broadcast_timeout: self.broadcast_timeout,
            ..SerfConfig::default()
        }
    }

    /// Defaults, then the configuration files, then the flags, as Serf merges them.
    pub fn resolve(&self) -> Result<SerfAgent> {
        let mut config = SerfConfig::read_paths(&self.config)?;
        config.merge(self.command_line());
        Ok(config.resolve()?)
    }
}

/// Runs the agent `serf` resolved from `args` (see [`AgentArgs::resolve`]).
pub async fn run(args: AgentArgs, serf: SerfAgent) -> Result<ExitCode> {
    // Serf takes an empty value as "not set"; Phoenix refuses an empty token outright.
    if args
        .rpc_auth
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        bail!("--rpc-auth is empty: an empty token is refused");
    }
    for warning in &serf.warnings {
        eprintln!("phoenix agent: {warning}");
    }
    let settings = &serf.settings;
    if !settings.bind.ip().is_loopback() && settings.encrypt.is_none() {
        bail!(
            "--bind {} is not loopback: gossip beyond this machine must be encrypted: give --encrypt KEY (from `phoenix keygen`) or --keyring-file FILE",
            settings.bind
        );
    }
    if !settings.rpc_addr.ip().is_loopback() && settings.rpc_auth.is_none() {
        bail!(
            "--rpc-addr {} is not loopback: give --rpc-auth TOKEN",
            settings.rpc_addr
        );
    }
    let config = serf.agent_config().context("-encrypt")?;
    let agent = Agent::start(config).await?;
    let (rpc, handlers) = serve(&agent, settings).await?;
    eprintln!(
        "phoenix agent: node {}, gossip {}, RPC {rpc}",
        agent.name(),
        agent.local_addr()
    );
    if !settings.join.is_empty() {
        let through = agent
            .join_any(&settings.join, Duration::from_secs(60))
            .await?;
        eprintln!("phoenix agent: joined through {through}");
        if serf.replay_on_join {
            agent.replay_from(through).await?;
        }
    }
    let retry_join = retry_join(&agent, &serf);
    tokio::pin!(retry_join);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let left = tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            if serf.skip_leave_on_interrupt {
                eprintln!("phoenix agent: interrupted; stopping without leaving");
                false
            } else {
                eprintln!("phoenix agent: leaving the cluster");
                agent.leave().await?;
                true
            }
        }
        _ = terminate.recv() => {
            // As Serf: a TERM is a failure to the others unless `leave_on_terminate`.
            if serf.leave_on_terminate {
                eprintln!("phoenix agent: terminated; leaving the cluster");
                agent.leave().await?;
            } else {
                eprintln!("phoenix agent: terminated; stopping without leaving");
            }
            serf.leave_on_terminate
        }
        // `serf leave` (the RPC `leave`) stops the agent, and with it the process, as Serf's.
        _ = agent.stopped() => {
            // The RPC answer to `leave` is on its way out: give it a moment before exiting.
            tokio::time::sleep(Duration::from_millis(200)).await;
            eprintln!("phoenix agent: left the cluster");
            true
        }
        failed = &mut retry_join => return failed.map(|()| ExitCode::FAILURE),
    };
    if left {
        // The handlers hear the agent's own leave (and whatever was still held), as Serf's.
        let _ = tokio::time::timeout(HANDLERS_GRACE, handlers).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// How long a leaving agent waits for its handlers' last run.
const HANDLERS_GRACE: Duration = Duration::from_secs(30);

/// Serf's `-retry-join`: tries the addresses every `retry_interval` until one answers (then
/// stays pending for ever) or `retry_max_attempts` ran out (then fails).
async fn retry_join(agent: &Agent, serf: &SerfAgent) -> Result<()> {
    if serf.retry_join.is_empty() {
        return std::future::pending().await;
    }
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match agent.join_any(&serf.retry_join, Duration::ZERO).await {
            Ok(through) => {
                eprintln!("phoenix agent: joined through {through} (retry-join)");
                if serf.replay_on_join {
                    agent.replay_from(through).await?;
                }
                return std::future::pending().await;
            }
            Err(error) => eprintln!("phoenix agent: retry-join attempt {attempt}: {error}"),
        }
        if serf.retry_max_attempts > 0 && attempt >= serf.retry_max_attempts {
            bail!("max join retry exhausted, exiting");
        }
        tokio::time::sleep(serf.retry_interval).await;
    }
}

/// Serves `agent`'s RPC (Serf's protocol) at `settings.rpc_addr` and runs its event handlers
/// (`phoenix agent` and `phoenix up` alike); returns the RPC address and the handlers' task,
/// which ends once the agent stopped and the handlers ran for the last events.
pub async fn serve(
    agent: &Agent,
    settings: &AgentSettings,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handlers = settings
        .event_handlers
        .iter()
        .map(|spec| Handler::parse(spec))
        .collect::<Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind(settings.rpc_addr)
        .await
        .with_context(|| format!("bind the agent's RPC address {}", settings.rpc_addr))?;
    let rpc = listener.local_addr()?;
    let options = rpc::ServeOptions {
        auth_key: settings.rpc_auth.clone(),
        logs: crate::monitor_log::logs(),
        event_handlers: handlers.iter().flat_map(Handler::info_entries).collect(),
    };
    tokio::spawn(rpc::serve(listener, agent.clone(), options));
    tokio::spawn(log_events(agent.subscribe()));
    let handlers = match handlers.is_empty() {
        true => tokio::spawn(async {}),
        false => tokio::spawn(handlers::run(agent.clone(), handlers)),
    };
    Ok((rpc, handlers))
}

/// Logs every event the agent receives, as Serf's agent does (`monitor` shows them).
async fn log_events(mut events: tokio::sync::broadcast::Receiver<phoenix_gossip::Event>) {
    use phoenix_gossip::Event;
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let described = match &event {
            Event::User(user) => format!("user-event: {}", user.name),
            Event::Query(query) => format!("query: {}", query.name),
            other => rpc::member_event_parts(other)
                .map(|(kind, _)| kind.to_string())
                .unwrap_or_default(),
        };
        tracing::info!(target: "agent", "Received event: {described}");
    }
}

#[derive(Args)]
pub struct RpcArgs {
    /// The agent's RPC address [default: the running `phoenix up`'s (STATE/rpc.addr), else
    /// 127.0.0.1:7373].
    #[arg(long, env = "SERF_RPC_ADDR")]
    rpc_addr: Option<SocketAddr>,
    /// RPC token, when the agent requires one.
    #[arg(long, env = "SERF_RPC_AUTH")]
    rpc_auth: Option<String>,
}

/// Where `phoenix up` writes its agent's RPC address.
pub const RPC_ADDR_FILE: &str = "rpc.addr";

impl RpcArgs {
    async fn client(&self, state: &Path) -> Result<Client> {
        let addr = match self.rpc_addr {
            Some(addr) => addr,
            None => std::fs::read_to_string(state.join(RPC_ADDR_FILE))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or_else(|| DEFAULT_RPC.parse().expect("a valid default")),
        };
        Client::connect(addr, self.rpc_auth.as_deref())
            .await
            .map_err(|e| anyhow!("agent RPC at {addr}: {e}"))
    }
}

#[derive(Args)]
pub struct MembersArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Only members whose status matches this regular expression, anchored as Serf anchors
    /// it (`^PATTERN$`): alive, suspect, failed, left.
    #[arg(long)]
    status: Option<String>,
    /// Only members whose tag KEY matches the regular expression PATTERN, anchored as Serf
    /// anchors it (`^PATTERN$`; a missing tag is ""): KEY=PATTERN, repeatable.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    #[arg(long)]
    json: bool,
}

pub async fn members(state: &Path, args: MembersArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
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
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn event(state: &Path, args: EventArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    let request = rpc::EventRequest {
        name: args.name.clone(),
        payload: args.payload.unwrap_or_default().into_bytes(),
        coalesce: args.coalesce,
    };
    client
        .call::<()>("event", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    answer(
        args.json,
        json!({"event": args.name, "coalesce": args.coalesce}),
        format!(
            "Event '{}' dispatched! Coalescing enabled: {}",
            args.name, args.coalesce
        ),
    )
}

#[derive(Args)]
pub struct JoinArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    #[arg(required = true)]
    addresses: Vec<String>,
    /// Replay the user events each agent joined through remembers (its last 64).
    #[arg(long)]
    replay: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn join(state: &Path, args: JoinArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    let request = rpc::JoinRequest {
        existing: args.addresses,
        replay: args.replay,
    };
    let response: rpc::JoinResponse = client
        .call("join", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    answer(
        args.json,
        json!({"joined": response.num}),
        format!(
            "Successfully joined cluster by contacting {} nodes.",
            response.num
        ),
    )
}

#[derive(Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn leave(state: &Path, args: LeaveArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    client
        .call::<()>("leave", None)
        .await
        .map_err(|e| anyhow!(e))?;
    answer(
        args.json,
        json!({"left": true}),
        "Graceful leave complete".into(),
    )
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
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn tags(state: &Path, args: TagsArgs) -> Result<ExitCode> {
    if args.set.is_empty() && args.delete.is_empty() {
        bail!("give --set KEY=VALUE or --delete KEY");
    }
    let mut client = args.rpc.client(state).await?;
    let request = rpc::TagsRequest {
        tags: args.set.into_iter().collect(),
        delete_tags: args.delete,
    };
    client
        .call::<()>("tags", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    answer(
        args.json,
        json!({"set": request.tags, "deleted": request.delete_tags}),
        "Successfully updated agent tags".into(),
    )
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
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Changes (or lists) the keyring on every member: the agent asks the cluster with an
/// internal query and reports each member's answer.
pub async fn keys(state: &Path, args: KeysArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    let (command, key) = match (args.install, args.use_key, args.remove) {
        (Some(key), _, _) => ("install-key", Some(key)),
        (_, Some(key), _) => ("use-key", Some(key)),
        (_, _, Some(key)) => ("remove-key", Some(key)),
        _ if args.list => ("list-keys", None),
        _ => bail!("give --install, --use, --remove or --list"),
    };
    let request = key.map(|key| KeyRequest { key });
    let body = request.as_ref().map(|r| r as &dyn rpc::erased::Encode);
    client.send(command, body).await.map_err(|e| anyhow!(e))?;
    // These commands answer with a body even on error: it names the members that failed.
    let header: rpc::ResponseHeader = client.read().await.map_err(|e| anyhow!(e))?;
    let response: KeyResponse = client.read().await.map_err(|e| anyhow!(e))?;
    for (node, message) in &response.messages {
        eprintln!("{node}: {message}");
    }
    if !header.error.is_empty() {
        bail!("{command} failed: {}", header.error);
    }
    if args.json {
        let answer = json!({
            "command": command,
            "keys": response.keys,
            "members": response.num_nodes,
            "answered": response.num_resp,
            "messages": response.messages,
        });
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if command == "list-keys" {
        for (key, count) in &response.keys {
            println!("{key}  {count}/{}", response.num_nodes);
        }
    } else {
        println!(
            "{command}: done on {}/{} members",
            response.num_resp, response.num_nodes
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Only this node answers; repeatable.
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Only nodes whose tag KEY matches the regular expression PATTERN (unanchored, as in
    /// Serf) answer: KEY=PATTERN, repeatable.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    /// How long to wait for answers, e.g. `5s` or `500ms` (default: the agent's, which grows
    /// with the cluster).
    #[arg(long, value_parser = phoenix_fleet::config::parse_duration)]
    timeout: Option<Duration>,
    /// Do not ask members to ack.
    #[arg(long)]
    no_ack: bool,
    /// Send each answer through this many other members too.
    #[arg(long, default_value_t = 0)]
    relay_factor: u8,
    #[arg(long)]
    json: bool,
    name: String,
    payload: Option<String>,
}

/// Asks a query and prints each ack and response as it arrives, then the counts.
pub async fn query(state: &Path, args: QueryArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    let request = rpc::QueryRequest {
        filter_nodes: args.nodes,
        filter_tags: args.tags.into_iter().collect(),
        request_ack: !args.no_ack,
        relay_factor: args.relay_factor,
        timeout: args.timeout.map_or(0, |t| t.as_nanos() as i64),
        name: args.name.clone(),
        payload: args.payload.unwrap_or_default().into_bytes(),
    };
    let seq = client
        .send("query", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    let header: rpc::ResponseHeader = client.read().await.map_err(|e| anyhow!(e))?;
    if !header.error.is_empty() {
        bail!("query {}: {}", args.name, header.error);
    }
    if !args.json {
        println!("Query '{}' dispatched", args.name);
    }
    let (mut acks, mut responses) = (Vec::new(), BTreeMap::new());
    loop {
        let header: rpc::ResponseHeader = client.read().await.map_err(|e| anyhow!(e))?;
        let record: rpc::QueryRecord = client.read().await.map_err(|e| anyhow!(e))?;
        if header.seq != seq {
            continue;
        }
        let payload = String::from_utf8_lossy(&record.payload).into_owned();
        match record.kind.as_str() {
            "ack" if !args.json => println!("Ack from '{}'", record.from),
            "response" if !args.json => println!("Response from '{}': {payload}", record.from),
            "done" => break,
            _ => {}
        }
        match record.kind.as_str() {
            "ack" => acks.push(record.from),
            "response" => {
                responses.insert(record.from, payload);
            }
            _ => {}
        }
    }
    if args.json {
        let value = serde_json::json!({ "acks": acks, "responses": responses });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("Total Acks: {}", acks.len());
        println!("Total Responses: {}", responses.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ForceLeaveArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// The failed member to list as left.
    node: String,
    /// Forget the member at once, everywhere, rather than list it as left until reaped.
    #[arg(long)]
    prune: bool,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn force_leave(state: &Path, args: ForceLeaveArgs) -> Result<ExitCode> {
    let mut client = args.rpc.client(state).await?;
    let node = args.node.clone();
    let request = rpc::ForceLeaveRequest {
        node: args.node,
        prune: args.prune,
    };
    client
        .call::<()>("force-leave", Some(&request))
        .await
        .map_err(|e| anyhow!(e))?;
    answer(
        args.json,
        json!({"left": node, "pruned": args.prune}),
        match args.prune {
            true => format!("{node} is forgotten"),
            false => format!("{node} is listed as left"),
        },
    )
}

pub async fn monitor(state: &Path, args: RpcArgs) -> Result<ExitCode> {
    let mut client = args.client(state).await?;
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

/// Prints `value` as JSON, or `text`.
fn answer(json: bool, value: serde_json::Value, text: String) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
