//! `phoenix verify`: goss-format checks against this machine (`--host FILE`), against a
//! throwaway instance of an image (`IMAGE`), or served as a health endpoint (`serve FILE`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use phoenix_check::{
    Format, FormatOptions, Report, RunOptions, Suite, SuiteError, Target, TemplateData,
};
use phoenix_fleet::{Clock, FleetFile, Progress, Verifier, VerifyOptions, parse_duration};
use phoenix_image::short_digest;

/// Exit status for a file that cannot be loaded, as goss.
const BAD_FILE: u8 = 2;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VerifyArgs {
    #[command(subcommand)]
    pub command: Option<VerifyCommand>,
    /// The image to verify: a recipe of the fleet file (baked first when needed), or an image
    /// name, digest or digest prefix.
    #[arg(required_unless_present = "host", conflicts_with = "host")]
    pub image: Option<String>,
    /// Check this machine with a goss file instead (like `goss validate`).
    #[arg(long, value_name = "FILE")]
    pub host: Option<PathBuf>,
    /// The fleet file (for IMAGE).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum VerifyCommand {
    /// Serve a goss file's result as a health endpoint: 200 when every check passes, else 503.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The goss file.
    pub checks: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How long a result is served before the checks run again.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub cache: Duration,
    #[arg(long, default_value = "/healthz")]
    pub endpoint: String,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// A YAML or JSON file whose values templates read as `{{.Vars.NAME}}`; repeatable, a
    /// later file's keys win.
    #[arg(long, value_name = "FILE")]
    pub vars: Vec<PathBuf>,
    /// Variables as YAML or JSON text (`--vars-inline '{"port": 8080}'`); they win over
    /// `--vars` files, as in goss.
    #[arg(long, value_name = "YAML")]
    pub vars_inline: Option<String>,
    /// rspecish (goss's default), documentation, json, junit, tap, nagios, prometheus or silent.
    #[arg(long, default_value = "rspecish", value_parser = format)]
    pub format: Format,
    /// goss's format options, repeatable or comma-separated: pretty, sort (json, and sort for
    /// every format), perfdata, verbose (nagios; verbose for prometheus), exclude_raw.
    #[arg(long = "format-options", short = 'o', value_name = "OPTION", value_parser = format_option)]
    pub format_options: Vec<FormatOptions>,
    /// Retry failing checks until they pass or this much time has passed.
    #[arg(long, value_parser = duration)]
    pub retry_timeout: Option<Duration>,
    /// Pause between retries.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub sleep: Duration,
    /// How many checks run at once.
    #[arg(long, default_value_t = 50)]
    pub max_concurrent: usize,
    /// No colors, even on a terminal.
    #[arg(long)]
    pub no_color: bool,
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

fn format(text: &str) -> Result<Format, String> {
    text.parse()
}

fn format_option(text: &str) -> Result<FormatOptions, String> {
    FormatOptions::parse(&[text])
}

impl RunArgs {
    fn options(&self, default_retry: Duration) -> RunOptions {
        RunOptions {
            max_concurrent: self.max_concurrent.max(1),
            retry_timeout: self.retry_timeout.unwrap_or(default_retry),
            sleep: self.sleep,
        }
    }

    /// The `--vars` files, then `--vars-inline`, merged key by key (later wins).
    fn vars(&self) -> Result<serde_json::Value, SuiteError> {
        let mut vars = serde_json::Value::Null;
        for path in &self.vars {
            phoenix_check::merge_vars(&mut vars, phoenix_check::load_vars(path)?);
        }
        if let Some(text) = &self.vars_inline {
            let inline = phoenix_check::parse_vars(std::path::Path::new("--vars-inline"), text)?;
            phoenix_check::merge_vars(&mut vars, inline);
        }
        Ok(vars)
    }

    /// Every `-o` given, together.
    fn format_options(&self) -> FormatOptions {
        self.format_options
            .iter()
            .fold(FormatOptions::default(), |all, o| FormatOptions {
                pretty: all.pretty || o.pretty,
                sort: all.sort || o.sort,
                perfdata: all.perfdata || o.perfdata,
                verbose: all.verbose || o.verbose,
                exclude_raw: all.exclude_raw || o.exclude_raw,
            })
    }

    fn render(&self, report: &Report, format: Format, color: bool) -> String {
        phoenix_check::render(report, format, &self.format_options(), color)
    }

    /// Prints `report` and returns goss's exit status for it in this format.
    fn print(&self, report: &Report) -> ExitCode {
        let color = !self.no_color && std::io::stdout().is_terminal();
        print!("{}", self.render(report, self.format, color));
        ExitCode::from(self.format.exit_status(report))
    }
}

pub async fn run(state: &Path, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    match (&args.command, &args.host, &args.image) {
        (Some(VerifyCommand::Serve(serve_args)), _, _) => serve(serve_args).await,
        (None, Some(file), _) => host(file, &args.run).await,
        (None, None, Some(image)) => {
            verify_image(
                state,
                &crate::locate::fleet_file(args.file.as_deref()),
                image,
                &args.run,
            )
            .await
        }
        (None, None, None) => anyhow::bail!("say what to verify: IMAGE, --host FILE or serve FILE"),
    }
}

/// Loads a goss file, or prints why it cannot be loaded.
fn load(file: &Path, run: &RunArgs) -> Result<Suite, ExitCode> {
    let loaded = run.vars().and_then(|vars| {
        let data = TemplateData {
            vars,
            env: std::env::vars().collect(),
        };
        phoenix_check::load(file, &data)
    });
    let suite = loaded.map_err(bad_file)?;
    for warning in &suite.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(suite)
}

/// Says why a check or vars file is unusable; goss's exit status for that.
fn bad_file(error: SuiteError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(BAD_FILE)
}

async fn host(file: &Path, run: &RunArgs) -> anyhow::Result<ExitCode> {
    let suite = match load(file, run) {
        Ok(suite) => suite,
        Err(code) => return Ok(code),
    };
    let options = run.options(Duration::ZERO);
    let report =
        tokio::task::spawn_blocking(move || phoenix_check::run(&suite, &Target::host(), &options))
            .await?;
    Ok(run.print(&report))
}

async fn verify_image(
    state: &Path,
    fleet_path: &Path,
    reference: &str,
    run: &RunArgs,
) -> anyhow::Result<ExitCode> {
    let fleet = FleetFile::load(fleet_path)?;
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let (verifier, warnings) = Verifier::open(state, &fleet)?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    let (name, digest) = resolve(&verifier, &fleet, reference).await?;
    let vars = match run.vars() {
        Ok(vars) => vars,
        Err(error) => return Ok(bad_file(error)),
    };
    let defaults = VerifyOptions::default();
    let options = VerifyOptions {
        run: run.options(defaults.run.retry_timeout),
        vars,
        ..defaults
    };
    let (progress, mut lines) = Progress::channel();
    let printer = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            eprintln!("{line}");
        }
    });
    let now = phoenix_fleet::SystemClock.now_ms();
    let result = verifier
        .verify(&fleet, &name, &digest, &options, &progress, now)
        .await;
    drop(progress);
    let _ = printer.await;
    let verification = match result {
        Err(phoenix_fleet::FleetError::Checks(error)) => return Ok(bad_file(error)),
        other => other?,
    };
    let code = run.print(&verification.report);
    if !verification.log_tail.is_empty() {
        eprintln!(
            "last lines of the instance's output (more: phoenix logs {}):",
            verification.instance
        );
    }
    for line in &verification.log_tail {
        eprintln!("  | {line}");
    }
    let row = &verification.row;
    eprintln!(
        "image {name} {}: verification {} ({} of {} checks failed), recorded in the journal",
        short_digest(&digest),
        if row.passed { "passed" } else { "failed" },
        row.failed,
        row.total
    );
    Ok(code)
}

/// A recipe name bakes (a no-op when unchanged); anything else is looked up in the store.
async fn resolve(
    verifier: &Verifier,
    fleet: &FleetFile,
    reference: &str,
) -> anyhow::Result<(String, String)> {
    let store = verifier.store.clone();
    if fleet.images.contains_key(reference) {
        let (images, fleet, name) = (
            verifier.images.clone(),
            fleet.clone(),
            reference.to_string(),
        );
        let options = crate::up::bake_options()?;
        let outcome = tokio::task::spawn_blocking(move || {
            let now = phoenix_fleet::SystemClock.now_ms();
            phoenix_fleet::bake_image(&store, &images, &fleet, &name, options, now, &mut ())
        })
        .await??;
        return Ok((outcome.name, outcome.digest));
    }
    let key = reference.to_string();
    let image = tokio::task::spawn_blocking(move || store.find_image(&key))
        .await??
        .with_context(|| {
            format!("no image or recipe matches {reference:?}: see `phoenix images`")
        })?;
    Ok((image.name, image.digest))
}

/// The cached result `serve` answers with.
struct Served {
    suite: Suite,
    options: RunOptions,
    cache: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Arc<Report>)>>,
}

impl Served {
    /// The cached report, or a fresh run when it is older than the cache time. Concurrent
    /// requests wait for the same run.
    async fn report(self: &Arc<Self>) -> Arc<Report> {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref()
            && at.elapsed() < self.cache
        {
            return report.clone();
        }
        let served = self.clone();
        let report = tokio::task::spawn_blocking(move || {
            phoenix_check::run(&served.suite, &Target::host(), &served.options)
        })
        .await
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("check run panicked: {e}"));
        *last = Some((Instant::now(), report.clone()));
        report
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let suite = match load(&args.checks, &args.run) {
        Ok(suite) => suite,
        Err(code) => return Ok(code),
    };
    let served = Arc::new(Served {
        suite,
        options: args.run.options(Duration::ZERO),
        cache: args.cache,
        last: tokio::sync::Mutex::new(None),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "serving {} on http://{}{}",
        args.checks.display(),
        listener.local_addr()?,
        args.endpoint
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let (served, endpoint) = (served.clone(), args.endpoint.clone());
        let style = (args.run.format, args.run.format_options());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (served, endpoint) = (served.clone(), endpoint.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(&served, &endpoint, style, request).await,
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer<B>(
    served: &Arc<Served>,
    endpoint: &str,
    (default, options): (Format, FormatOptions),
    request: Request<B>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != endpoint {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("not found; try {endpoint}\n"),
        );
    }
    let format = negotiate(request.headers().get(http::header::ACCEPT), default);
    let report = served.report().await;
    let status = if report.passed() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(
        status,
        format.media_type(),
        phoenix_check::render(&report, format, &options, false),
    )
}

/// `Accept: application/json` gives JSON; `application/vnd.goss-FORMAT` (as goss) any format;
/// anything else the `--format` default.
fn negotiate(accept: Option<&http::HeaderValue>, default: Format) -> Format {
    let accept = accept.and_then(|v| v.to_str().ok()).unwrap_or("");
    for media in accept
        .split(',')
        .map(|m| m.split(';').next().unwrap_or("").trim())
    {
        if let Some(name) = media.strip_prefix("application/vnd.goss-")
            && let Ok(format) = name.parse()
        {
            return format;
        }
        match media {
            "application/json" => return Format::Json,
            "application/xml" | "text/xml" => return Format::Junit,
            _ => {}
        }
    }
    default
}

fn reply(status: StatusCode, media: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(media) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}
