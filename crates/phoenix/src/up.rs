//! `phoenix up`: controller, agent and proxy in one foreground process.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use phoenix_fleet::{Controller, Options};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::API_ADDR_FILE;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub log: crate::LogArgs,
    /// The fleet file [default: the nearest phoenix.toml, up from here].
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Also serve the API on this TCP address (it is always on STATE/api.sock, for the
    /// owner). TCP needs tokens (--api-tokens or PHOENIX_API_TOKEN) or mutual TLS.
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// Bearer tokens for TCP clients: lines of `NAME SCOPE SECRET`, SCOPE `read` or
    /// `operate`; the file must be mode 0600. PHOENIX_API_TOKEN adds an operator token `env`.
    #[arg(long, value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// Host names (besides the listen address and localhost) that TCP clients may use.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// Serve TCP with TLS using this certificate (PEM); needs --api-tls-key and
    /// --api-client-ca: only clients with a certificate that CA signed get in.
    #[arg(long, value_name = "FILE", requires_all = ["api_tls_key", "api_client_ca", "api_listen"])]
    pub api_tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    pub api_client_ca: Option<PathBuf>,
    /// Serve the web dashboard here (loopback only: it is plain HTTP; reach it from elsewhere
    /// through `ssh -L`). `phoenix dashboard` prints a login URL.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub dashboard_listen: SocketAddr,
    /// Serve no dashboard.
    #[arg(long, conflicts_with = "dashboard_listen")]
    pub no_dashboard: bool,
    /// Refused: a token on the command line shows in `ps` to every user.
    #[arg(long, hide = true, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub host: HostArgs,
    /// Seed for generated instance names (for reproducible runs).
    #[arg(long, hide = true)]
    pub seed: Option<u64>,
    /// Stop everything once no role has had a request for this long (a review fleet's `ttl`).
    #[arg(long, hide = true, value_parser = crate::review_cmd::parse_ttl)]
    pub idle_exit: Option<std::time::Duration>,
    /// A review fleet's directory, removed once `--idle-exit` has stopped everything.
    #[arg(long, hide = true, requires = "idle_exit")]
    pub review_dir: Option<PathBuf>,
}

/// This machine as a host of a `[cluster]` fleet (ignored without one).
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// The host's name in the cluster [default: the gossip agent's name, the machine's host
    /// name]. Each machine needs its own.
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
    /// The address other hosts reach this one's instances and proxy at [default: the gossip
    /// agent's address].
    #[arg(long, value_name = "IP")]
    pub host_address: Option<std::net::IpAddr>,
    /// A tag roles can ask for (`[role.X] hosts = { tag = "zone=a" }`); repeat for more.
    #[arg(long = "host-tag", value_name = "KEY=VALUE")]
    pub host_tags: Vec<String>,
    /// CPUs this host offers instances [default: all of them].
    #[arg(long, value_name = "CPUS")]
    pub host_cpus: Option<f64>,
    /// Memory this host offers instances, like 16GiB [default: all of it].
    #[arg(long, value_name = "SIZE")]
    pub host_memory: Option<String>,
}

impl HostArgs {
    fn settings(&self) -> anyhow::Result<phoenix_fleet::cluster::HostSettings> {
        // The same KEY=VALUE a role's `hosts = { tag = ... }` is written in.
        let tags = phoenix_fleet::cluster::HostConstraint::parse(&self.host_tags)
            .map_err(|why| anyhow::anyhow!("--host-tag: {why}"))?
            .tags
            .into_iter()
            .collect();
        if let Some(name) = &self.host_name
            && (name.is_empty()
                || name.len() > 63
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            bail!("--host-name {name:?}: use 1 to 63 letters, digits, '-' and '.'");
        }
        if let Some(cpus) = self.host_cpus
            && !(0.01..=4096.0).contains(&cpus)
        {
            bail!("--host-cpus {cpus}: give between 0.01 and 4096");
        }
        let memory = match &self.host_memory {
            Some(text) => Some(
                phoenix_fleet::parse_size(text)
                    .map_err(|e| anyhow::anyhow!("--host-memory: {e}"))?,
            ),
            None => None,
        };
        Ok(phoenix_fleet::cluster::HostSettings {
            name: self.host_name.clone(),
            address: self.host_address,
            tags,
            cpus: self.host_cpus,
            memory,
        })
    }
}

/// TLS to the etcd members of the fleet file's `[cluster]`, when it names a CA.
fn cluster_tls(file: &Path) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    let Ok(fleet) = phoenix_fleet::FleetFile::load(file) else {
        return Ok(None); // Controller::open reports what is wrong with the file.
    };
    let Some(cluster) = fleet.cluster else {
        return Ok(None);
    };
    let Some(ca) = &cluster.ca else {
        return Ok(None);
    };
    let identity = cluster.cert.as_deref().zip(cluster.key.as_deref());
    Ok(Some(phoenix_api::tls::client_config_maybe_identity(
        ca, identity,
    )?))
}

/// The file in the state directory where the owner's API socket is.
pub const API_SOCKET: &str = "api.sock";

/// The tokens of `--api-tokens` and `PHOENIX_API_TOKEN`.
fn load_tokens(args: &UpArgs) -> anyhow::Result<Vec<phoenix_api::Token>> {
    if args.token.is_some() {
        bail!(
            "--token is not taken on the command line (every user sees it in `ps`): put tokens in a file given with --api-tokens, or in PHOENIX_API_TOKEN"
        );
    }
    let mut tokens = match &args.api_tokens {
        Some(path) => phoenix_api::Token::load_file(path)?,
        None => Vec::new(),
    };
    if let Some(value) = std::env::var_os("PHOENIX_API_TOKEN") {
        tokens.push(phoenix_api::Token::from_env_value(
            &value.to_string_lossy(),
        )?);
    }
    Ok(tokens)
}

/// What `phoenix up` serves the API on, checked before anything starts.
struct ApiPlan {
    tokens: Vec<phoenix_api::Token>,
    tcp: Option<(SocketAddr, Option<std::sync::Arc<rustls::ServerConfig>>)>,
}

/// Serves the dashboard on `addr`, a loopback address: it speaks plain HTTP.
async fn serve_dashboard(
    controller: &Controller,
    addr: SocketAddr,
    tokens: &[phoenix_api::Token],
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(
    phoenix_api::DashboardLink,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    if !addr.ip().is_loopback() {
        bail!(
            "--dashboard-listen {addr}: the dashboard serves plain HTTP, so only on a loopback address (127.0.0.1, ::1); from another machine, forward a port over SSH (ssh -L 7080:127.0.0.1:7080 HOST)"
        );
    }
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the dashboard (--dashboard-listen)")
    })?;
    let addr = listener.local_addr()?;
    let sessions = phoenix_api::dashboard::Sessions::new();
    let router =
        phoenix_api::dashboard::router(controller.clone(), sessions.clone(), tokens.to_vec());
    let hosts = phoenix_api::HostPolicy::new(addr, &[]);
    let task = tokio::spawn(phoenix_api::serve_tcp(
        listener, None, hosts, router, stopped,
    ));
    Ok((phoenix_api::DashboardLink { sessions, addr }, task))
}

fn plan_api(args: &UpArgs) -> anyhow::Result<ApiPlan> {
    let tokens = load_tokens(args)?;
    let tls = match (&args.api_tls_cert, &args.api_tls_key, &args.api_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(phoenix_api::tls::server_config(cert, key, ca)?),
        _ => None,
    };
    let tcp = match args.api_listen {
        Some(addr) => {
            phoenix_api::check_tcp(addr, &tokens, tls.is_some())?;
            Some((addr, tls))
        }
        None => None,
    };
    Ok(ApiPlan { tokens, tcp })
}

pub async fn run(state: &Path, args: UpArgs) -> anyhow::Result<ExitCode> {
    // Handled from the start: a signal that came during a restart was kept pending for us.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    crate::restart::unblock_stop_signals().await;
    let api_plan = plan_api(&args)?;
    raise_descriptor_limit();
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    // Started by `phoenix restart`: the previous program's sockets, lock and instances.
    let mut inheritance = crate::restart::inherited()?;
    let lock = match inheritance.as_mut().and_then(|i| i.lock.take()) {
        Some(fd) => std::fs::File::from(fd),
        None => lock_state(state)?,
    };
    let file = crate::locate::fleet_file(args.file.as_deref());
    let mut options = Options::new(state.to_path_buf(), file.clone());
    options.seed = args.seed;
    options.bake = bake_options()?;
    options.inherited = inheritance.as_mut().map(|i| std::mem::take(&mut i.handed));
    options.host = args.host.settings()?;
    options.cluster_tls = cluster_tls(&file)?;
    let controller = Controller::open(options).await?;
    let (rpc, _handlers) =
        crate::agent_cmd::serve(&controller.agent(), controller.agent_settings()).await?;
    // `phoenix members`, `event` and `query` find the agent here.
    write_atomically(state, crate::agent_cmd::RPC_ADDR_FILE, &format!("{rpc}\n"))?;
    let (restart_requests, mut restart_asked) = tokio::sync::mpsc::channel(4);
    let restarts = phoenix_api::Restarts {
        requests: restart_requests,
        info: std::sync::Arc::new(std::sync::Mutex::new(crate::restart::up_info(
            inheritance.as_ref(),
        ))),
    };
    let (api_stop, api_stopped) = tokio::sync::watch::channel(false);
    let mut apis = Vec::new();
    let dashboard = match args.no_dashboard {
        true => None,
        false => {
            let (link, task) = serve_dashboard(
                &controller,
                args.dashboard_listen,
                &api_plan.tokens,
                api_stopped.clone(),
            )
            .await?;
            apis.push(task);
            Some(link)
        }
    };
    let router = phoenix_api::router(
        controller.clone(),
        api_plan.tokens,
        Some(restarts.clone()),
        dashboard.clone(),
    );
    let socket_path = state.join(API_SOCKET);
    let socket = match inheritance.as_mut().and_then(|i| i.api_socket.take()) {
        Some(fd) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)?
        }
        None => phoenix_api::bind_owner_socket(&socket_path)
            .with_context(|| format!("cannot serve the API on {}", socket_path.display()))?,
    };
    // Copies that outlive the serving tasks, for the next program.
    let socket_fd = socket.as_fd().try_clone_to_owned()?;
    let mut tcp_fd = None;
    apis.push(tokio::spawn(phoenix_api::serve_unix(
        socket,
        router.clone(),
        api_stopped.clone(),
    )));
    let mut served_on = format!("API {} (owner only)", socket_path.display());
    if let Some(link) = &dashboard {
        served_on.push_str(&format!(
            ", dashboard http://{} (`phoenix dashboard` prints a login URL)",
            link.addr
        ));
    }
    if let Some((addr, tls)) = api_plan.tcp {
        let inherited_tcp = inheritance.as_mut().and_then(|i| i.api_tcp.take());
        let listener = match inherited_tcp.map(std::net::TcpListener::from) {
            Some(listener)
                if listener.local_addr().is_ok_and(|a| {
                    a.ip() == addr.ip() && (addr.port() == 0 || a.port() == addr.port())
                }) =>
            {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            _ => TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the API"))?,
        };
        let addr = listener.local_addr()?;
        tcp_fd = Some(listener.as_fd().try_clone_to_owned()?);
        write_api_addr(state, addr, tls.is_some())?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        served_on.push_str(&format!(", {scheme}://{addr}"));
        let hosts = phoenix_api::HostPolicy::new(addr, &args.api_hosts);
        apis.push(tokio::spawn(phoenix_api::serve_tcp(
            listener,
            tls,
            hosts,
            router,
            api_stopped,
        )));
    }
    println!(
        "phoenix up: fleet {}, state {}, {served_on}",
        file.display(),
        state.display()
    );
    println!(
        "gossip: node {}, gossip {}, RPC {rpc}",
        controller.agent().name(),
        controller.agent().local_addr()
    );
    for warning in controller.warnings() {
        eprintln!("warning: {warning}");
    }
    if let Some((bridge, subnet, gateway)) = controller.bridge() {
        println!("network: bridge {bridge}, subnet {subnet}, proxies also on {gateway}");
    }
    let placements = controller.placements();
    for (role, addr) in controller.listen_addrs() {
        let (driver, network) = placements
            .iter()
            .find(|(name, _, _)| *name == role)
            .map(|(_, driver, bridged)| (*driver, if *bridged { "bridge" } else { "host network" }))
            .unwrap_or(("?", "?"));
        println!("role {role}: proxy on http://{addr} ({driver} driver, {network})");
    }
    if let Some(inheritance) = &inheritance {
        let detail = crate::restart::announce(&controller, inheritance).await;
        restarts
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_restart = Some(detail);
    }
    let converging = {
        let controller = controller.clone();
        tokio::spawn(async move {
            for (role, error) in controller.converge().await {
                eprintln!("role {role} is not serving: {error}");
            }
            for role in controller.status().await.roles {
                if let Some(generation) = role.live_generation {
                    let healthy = role
                        .generations
                        .first()
                        .map(|g| g.instances.iter().filter(|i| i.status == "healthy").count())
                        .unwrap_or(0);
                    println!(
                        "role {}: generation {generation} live, {healthy}/{} instances healthy",
                        role.name, role.desired_instances
                    );
                }
            }
        })
    };
    let restarts_so_far = inheritance.as_ref().map_or(0, |i| i.restarts);
    let mut idle = std::pin::pin!(idle_for(&controller, args.idle_exit));
    let mut expired = false;
    loop {
        let (binary, reply) = tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut idle => {
                expired = true;
                println!("phoenix up: no request for {:?}: stopping (the review fleet's ttl)", args.idle_exit.unwrap_or_default());
                break;
            }
            _ = hangup.recv() => (None, None),
            Some(asked) = restart_asked.recv() => (asked.binary, Some(asked.reply)),
        };
        let fds = crate::restart::OwnFds {
            lock: lock.as_fd(),
            api_socket: socket_fd.as_fd(),
            api_tcp: tcp_fd.as_ref().map(|fd| fd.as_fd()),
        };
        // The API caller hears "restarting" once the handover is ready, or why not.
        let reply = std::sync::Mutex::new(reply);
        let ready = || {
            if let Some(reply) = reply.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = reply.send(Ok(()));
            }
        };
        let mut stopping = false;
        let stop_asked = || {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            stopping |= interrupt.poll_recv(&mut cx).is_ready();
            stopping |= terminate.poll_recv(&mut cx).is_ready();
            stopping
        };
        let outcome = crate::restart::restart(
            &controller,
            state,
            binary,
            fds,
            restarts_so_far,
            ready,
            stop_asked,
        )
        .await;
        if let Err(error) = outcome {
            eprintln!("phoenix up: not restarted: {error:#}");
            if let Some(reply) = reply.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = reply.send(Err(format!("{error:#}")));
            }
        }
        if stopping {
            break;
        }
    }
    println!(
        "phoenix up: stopping everything: draining requests, then stopping instances \
         (`phoenix restart` or SIGHUP restarts Phoenix without stopping them)"
    );
    converging.abort();
    controller.shutdown().await;
    api_stop.send_replace(true);
    for api in apis {
        let _ = api.await;
    }
    let _ = std::fs::remove_file(state.join(API_ADDR_FILE));
    let _ = std::fs::remove_file(state.join(crate::agent_cmd::RPC_ADDR_FILE));
    let _ = std::fs::remove_file(&socket_path);
    drop(lock);
    println!("phoenix up: stopped");
    if let (true, Some(dir)) = (expired, &args.review_dir) {
        crate::review_cmd::remove_expired(dir);
    }
    Ok(ExitCode::SUCCESS)
}

/// Ends once no role has answered a request for `ttl` (never without one).
async fn idle_for(controller: &Controller, ttl: Option<std::time::Duration>) {
    let Some(ttl) = ttl else {
        return std::future::pending().await;
    };
    let (mut seen, mut since) = (u64::MAX, tokio::time::Instant::now());
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1).min(ttl)).await;
        let requests: u64 = controller
            .status()
            .await
            .roles
            .iter()
            .map(|r| r.requests)
            .sum();
        if requests != seen {
            (seen, since) = (requests, tokio::time::Instant::now());
        } else if since.elapsed() >= ttl {
            return;
        }
    }
}

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org) sets the time recorded in images; `run`
/// steps are confined by this binary's bake-step helper.
pub fn bake_options() -> anyhow::Result<phoenix_image::BakeOptions> {
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"))?,
        Err(_) => 0,
    };
    let sandbox = std::env::current_exe()
        .context("cannot find this program's own path (the sandbox of bake steps)")?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(phoenix_image::BakeOptions {
        mtime,
        sandbox: Some(sandbox),
        // Root in a step is an unprivileged id range outside, as in instances.
        step_id_offset: if root { phoenix_fleet::ID_OFFSET } else { 0 },
    })
}

/// Raises this process's soft descriptor limit to its hard one, as HAProxy and nginx do: the
/// proxies size `max_connections` from it. Instances get their own limit (`nofile`).
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Holds an exclusive lock on the state directory for as long as the file stays open.
fn lock_state(state: &Path) -> anyhow::Result<std::fs::File> {
    let path = state.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        bail!(
            "another `phoenix up` is running with state directory {} (it holds {})",
            state.display(),
            path.display()
        );
    }
    Ok(file)
}

/// Where the TCP API is, for operators and scripts (the CLI uses the socket unless told).
fn write_api_addr(state: &Path, addr: SocketAddr, tls: bool) -> anyhow::Result<()> {
    let scheme = if tls { "https" } else { "http" };
    write_atomically(state, API_ADDR_FILE, &format!("{scheme}://{addr}\n"))
}

/// Writes `STATE/name` whole or not at all (a reader never sees half an address).
fn write_atomically(state: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = state.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, state.join(name))
        .with_context(|| format!("write {}", state.join(name).display()))?;
    Ok(())
}
