//! `phoenix`: immutable infrastructure in one binary.

mod agent_cmd;
mod client;
mod commands;
mod dashboard_cmd;
mod demo;
mod exec_cmd;
mod failure;
mod handlers;
mod help;
mod host_cmd;
mod image_cmd;
mod load;
mod load_cmd;
mod locate;
mod logs_cmd;
mod metrics_cmd;
mod monitor_log;
mod plan_cmd;
mod proxy_cmd;
mod restart;
mod review_cmd;
mod scale_cmd;
mod single_dash;
mod tls_cmd;
mod up;
mod verify_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{FromArgMatches, Parser, Subcommand};
use phoenix_fleet::config::SerfAgent;

#[derive(Parser)]
#[command(
    name = "phoenix",
    version,
    about = "Bake images, run fleets, deploy blue-green: immutable infrastructure in one binary"
)]
struct Cli {
    /// State directory: SQLite state, image store, instance logs [default: the nearest
    /// `.phoenix`, or `.phoenix` beside the nearest `phoenix.toml`, up from here].
    #[arg(long, global = true, env = "PHOENIX_STATE")]
    state: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run controller, agent and proxy in the foreground and converge to the fleet file.
    Up(up::UpArgs),
    /// Restart the running `phoenix up` without stopping its instances or dropping a request.
    Restart(restart::RestartArgs),
    /// Replace the running `phoenix up` with another binary, as `restart` does.
    Upgrade(restart::UpgradeArgs),
    /// What applying the fleet file would change on the running fleet (exit 2: changes).
    Plan(plan_cmd::PlanArgs),
    /// Apply the fleet file (or a saved plan) to the running fleet, without a restart.
    Apply(plan_cmd::ApplyArgs),
    /// Deploy a new generation of a role blue-green (bakes first if the recipe changed).
    Deploy(commands::DeployArgs),
    /// Deploy the image of the generation that served before the live one.
    Rollback(commands::RollbackArgs),
    /// Set the number of instances of a role's live generation (drains what it removes).
    Scale(scale_cmd::ScaleArgs),
    /// Keep an instance out of scale-in (`--off` clears it).
    Protect(scale_cmd::FlagArgs),
    /// Take an instance out of traffic and of scale-in, for investigation (`--off` returns it).
    Standby(scale_cmd::FlagArgs),
    /// A role's metric over time (cpu, memory, rps, errors, in_flight, p50_ms, p99_ms).
    Metrics(metrics_cmd::MetricsArgs),
    /// Every role's and instance's metrics now, refreshing every second on a terminal.
    Top(metrics_cmd::TopArgs),
    /// Run a command inside a running instance, as its user (exit code passed through).
    Exec(exec_cmd::ExecArgs),
    /// Roles, generations, instances, health and image digests (and hosts, in a cluster).
    Status(commands::StatusArgs),
    /// The hosts of a cluster: list them, drain one, undrain it.
    Host(host_cmd::HostArgs),
    /// Review fleets: isolated copies of the fleet from a branch or directory (up, ls, down).
    Review(review_cmd::ReviewArgs),
    /// A one-time login URL for the web dashboard of the running `phoenix up` (`--open`).
    Dashboard(dashboard_cmd::DashboardArgs),
    /// What a role's or an instance's instances wrote, from the log store (`-f` follows).
    Logs(logs_cmd::LogsArgs),
    /// The journal of a role: deploys, switches, aborts, instance starts and deaths.
    History(commands::HistoryArgs),
    /// Bake image recipes of the fleet file into the image store.
    Bake(commands::BakeArgs),
    /// List baked images.
    Images(commands::ImagesArgs),
    /// Inspect or remove images.
    Image(image_cmd::ImageArgs),
    /// Remove blobs and unpacked roots no recorded image or generation needs.
    Gc(image_cmd::GcArgs),
    /// Write an image as an OCI archive (podman load, skopeo, docker load).
    Export(image_cmd::ExportArgs),
    /// Read images from an OCI archive or layout into the store.
    Import(image_cmd::ImportArgs),
    /// Compare an instance's root with its image's file manifest; --replace rebuilds it.
    Drift(image_cmd::DriftArgs),
    /// Run goss-format checks: on this machine (--host FILE), on a throwaway instance of an
    /// image (recorded; deploys need a pass), or as a health endpoint (serve FILE).
    Verify(verify_cmd::VerifyArgs),
    /// Tell the whole story in about a minute, in a temporary state directory.
    Demo(demo::DemoArgs),
    /// Open-loop HTTP load at a fixed rate or from a scenario file (weighted requests, ramp
    /// stages, thresholds); latency percentiles (from each request's due time) and errors.
    Load(load_cmd::LoadArgs),
    /// Run the proxy alone in front of a fixed list of backends.
    Proxy(proxy_cmd::ProxyArgs),
    /// Run a gossip agent (Serf-compatible RPC; handlers get Serf's environment).
    Agent(agent_cmd::AgentArgs),
    /// Members of the cluster, as a running agent sees them.
    Members(agent_cmd::MembersArgs),
    /// Fire a user event through a running agent.
    Event(agent_cmd::EventArgs),
    /// Make a running agent join other agents.
    Join(agent_cmd::JoinArgs),
    /// Make a running agent leave the cluster gracefully and stop.
    Leave(agent_cmd::LeaveArgs),
    /// Set or delete a running agent's tags.
    Tags(agent_cmd::TagsArgs),
    /// Print a new random gossip key (base64, 32 bytes), for `[agent] encrypt_file`.
    Keygen,
    /// TLS helpers: a self-signed development certificate for a `[listener.NAME]`.
    Tls(tls_cmd::TlsArgs),
    /// Check the state directory's database (`phoenix up` refuses a damaged one).
    State(commands::StateArgs),
    /// Install, use, remove or list gossip encryption keys on every member.
    Keys(agent_cmd::KeysArgs),
    /// Stream a running agent's log of membership changes and events.
    Monitor(agent_cmd::RpcArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(help::CompletionsArgs),
    /// Print the man page, or write one per command with --dir.
    Man(help::ManArgs),
    /// Ask the cluster a query and print each ack and answer.
    Query(agent_cmd::QueryArgs),
    /// List a failed member as left, everywhere.
    ForceLeave(agent_cmd::ForceLeaveArgs),
}

/// Log verbosity: `--log` of the long-running commands (an agent's Serf `log_level` first),
/// else warnings only.
fn log_level(command: &Command, agent: Option<&SerfAgent>) -> tracing::Level {
    match command {
        Command::Up(args) => args.log.level,
        Command::Demo(args) => args.log.level,
        Command::Agent(args) => agent
            .and_then(|agent| agent.log_level)
            .unwrap_or(args.log.level),
        Command::Proxy(args) => args.log.level,
        _ => tracing::Level::WARN,
    }
}

/// Logs to stderr at the command's level; a command that serves Serf's RPC also keeps its
/// agent's log, at every level, for `serf monitor`.
fn init_logging(command: &Command, agent: Option<&SerfAgent>) {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::from_level(
            log_level(command, agent),
        ));
    let serves_rpc = matches!(command, Command::Agent(_) | Command::Up(_));
    tracing_subscriber::registry()
        .with(stderr)
        .with(serves_rpc.then(monitor_log::layer))
        .init();
}

/// `--log LEVEL` of a long-running command.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log verbosity (error, warn, info, debug, trace).
    #[arg(long = "log", default_value = "warn")]
    pub level: tracing::Level,
}

/// mimalloc instead of glibc's malloc: the proxy allocates and frees small objects per request
/// (HTTP/2 frames, header maps, tasks), and glibc's malloc took about 5 % of the proxy's time
/// on `bench/proxy` h2c (`perf`: _int_malloc, _int_free, unlink_chunk, malloc_consolidate).
/// Side by side, h2c went from 67,800–74,400 to 76,300–77,300 requests/s.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A container's shim, or checks run inside an instance: Phoenix's own binary started again.
    phoenix_fleet::run_helper_if_asked();
    let command = help::command();
    let args = single_dash::normalize(std::env::args_os().collect(), &command);
    let cli = match Cli::from_arg_matches(&command.get_matches_from(args)) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let state = locate::state_dir(cli.state.as_deref());
    // Entering an instance needs a process with one thread: before the async runtime. Its
    // output is the command's own: no log lines of Phoenix's around it.
    if let Command::Exec(args) = cli.command {
        return match exec_cmd::run(&state, args) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    // An agent's flags and Serf config files are merged once, here: they set the log level.
    let agent = match &cli.command {
        Command::Agent(args) => match args.resolve() {
            Ok(agent) => Some(agent),
            Err(error) => {
                eprintln!("error: {}", failure::message(&error));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    init_logging(&cli.command, agent.as_ref());
    // The main thread forks instances (see `phoenix_driver::launcher`); the program runs on
    // another.
    phoenix_driver::launcher::serve(move || run(cli, state, agent))
}

/// The command, on its async runtime; `agent` is an agent command's resolved configuration.
fn run(cli: Cli, state: PathBuf, agent: Option<SerfAgent>) -> ExitCode {
    // `phoenix proxy --threads 1` is one event loop, as HAProxy's nbthread 1 and one nginx worker.
    let mut builder = match &cli.command {
        Command::Proxy(proxy_cmd::ProxyArgs {
            threads: Some(1), ..
        }) => tokio::runtime::Builder::new_current_thread(),
        Command::Proxy(proxy_cmd::ProxyArgs {
            threads: Some(threads),
            ..
        }) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(*threads);
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(&state, args).await,
            Command::Review(args) => review_cmd::run(&state, args).await,
            Command::Restart(args) => restart::restart_cmd(&state, args).await,
            Command::Dashboard(args) => dashboard_cmd::dashboard(&state, args).await,
            Command::Upgrade(args) => restart::upgrade_cmd(&state, args).await,
            Command::Plan(args) => plan_cmd::plan(&state, args).await,
            Command::Apply(args) => plan_cmd::apply(&state, args).await,
            Command::Deploy(args) => commands::deploy(&state, args).await,
            Command::Rollback(args) => commands::rollback(&state, args).await,
            Command::Status(args) => commands::status(&state, args).await,
            Command::Logs(args) => logs_cmd::logs(&state, args).await,
            Command::Scale(args) => scale_cmd::scale(&state, args).await,
            Command::Metrics(args) => metrics_cmd::metrics(&state, args).await,
            Command::Top(args) => metrics_cmd::top(&state, args).await,
            Command::Protect(args) => scale_cmd::flag(&state, "protect", args).await,
            Command::Standby(args) => scale_cmd::flag(&state, "standby", args).await,
            Command::Host(args) => host_cmd::run(&state, args).await,
            Command::History(args) => commands::history(&state, args).await,
            Command::Bake(args) => commands::bake(&state, args).await,
            Command::Images(args) => commands::images(&state, args).await,
            Command::Image(args) => image_cmd::image(&state, args).await,
            Command::Gc(args) => image_cmd::gc(&state, args).await,
            Command::Export(args) => image_cmd::export(&state, args).await,
            Command::Import(args) => image_cmd::import(&state, args).await,
            Command::Drift(args) => image_cmd::drift(&state, args).await,
            Command::Verify(args) => verify_cmd::run(&state, args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Load(args) => load_cmd::run(args).await,
            Command::Proxy(args) => proxy_cmd::run(args).await,
            Command::Agent(args) => match agent {
                Some(agent) => agent_cmd::run(args, agent).await,
                None => unreachable!("an agent's configuration is resolved before the runtime"),
            },
            Command::Members(args) => agent_cmd::members(&state, args).await,
            Command::Event(args) => agent_cmd::event(&state, args).await,
            Command::Join(args) => agent_cmd::join(&state, args).await,
            Command::Leave(args) => agent_cmd::leave(&state, args).await,
            Command::Tags(args) => agent_cmd::tags(&state, args).await,
            Command::Keys(args) => agent_cmd::keys(&state, args).await,
            Command::State(args) => commands::state(&state, args),
            Command::Tls(args) => tls_cmd::run(args),
            Command::Keygen => {
                println!("{}", phoenix_gossip::Key::generate()?.to_base64());
                Ok(ExitCode::SUCCESS)
            }
            Command::Monitor(args) => agent_cmd::monitor(&state, args).await,
            Command::Query(args) => agent_cmd::query(&state, args).await,
            Command::ForceLeave(args) => agent_cmd::force_leave(&state, args).await,
            Command::Completions(args) => help::completions(args),
            Command::Man(args) => help::man(args),
            Command::Exec(_) => unreachable!("exec runs before the runtime starts"),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", failure::message(&error));
            // Scripts asked for JSON: they get the failure as JSON too, on stdout.
            if std::env::args().any(|arg| arg == "--json") {
                println!("{}", failure::json(&error));
            }
            ExitCode::FAILURE
        }
    }
}
