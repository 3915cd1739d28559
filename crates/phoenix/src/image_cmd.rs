//! The local image commands: `image inspect`, `image rm`, `gc`, `export`, `import`, `drift`,
//! and the progress display of `bake`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use phoenix_fleet::{Clock, SystemClock};
use phoenix_image::{ImageStore, RootLayout, StepReport, short_digest};
use phoenix_store::{GenerationStatus, Store};
use serde_json::json;

use crate::commands::human_size;

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// An image's config, layers and file manifest summary.
    Inspect {
        /// Name, digest or digest prefix (6+ hex digits).
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Forget images (their blobs go at the next `phoenix gc`); refused for an image a live
    /// or starting generation runs.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Name, digest or digest prefix.
    pub reference: String,
    /// The OCI archive to write.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// The name in the archive (`org.opencontainers.image.ref.name`, Docker's RepoTags);
    /// default the image's own `NAME:TAG`, else `NAME:latest`.
    #[arg(long)]
    pub tag: Option<String>,
    /// Print `{"digest", "ref", "path", "size"}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// An OCI archive or layout directory (`skopeo copy … oci-archive:FILE`, `podman save
    /// --format oci-archive`, `phoenix export`).
    pub path: PathBuf,
    /// Only the image with this ref name in the archive.
    #[arg(long = "ref")]
    pub reference: Option<String>,
    /// The name to record it under (default: its ref name in the archive).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DriftArgs {
    /// An instance name, or with --image, an image reference.
    pub target: String,
    /// Check the unpacked root of an image instead of an instance's.
    #[arg(long)]
    pub image: bool,
    /// Hash every file instead of only those whose status changed since unpacking.
    #[arg(long)]
    pub full: bool,
    /// When drifted: unpack the image again and replace the role's instances with fresh ones
    /// (a blue-green deploy of the same image through the running `phoenix up`).
    #[arg(long)]
    pub replace: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: crate::client::ApiArgs,
}

struct Local {
    store: Store,
    images: ImageStore,
}

impl Local {
    fn open(state: &Path) -> anyhow::Result<Local> {
        std::fs::create_dir_all(state)
            .with_context(|| format!("cannot create state directory {}", state.display()))?;
        Ok(Local {
            store: Store::open(state.join("state.db"))?,
            images: ImageStore::open(state.join("images"))?,
        })
    }

    /// The digest `reference` names, and the names it was recorded under.
    fn resolve(&self, reference: &str) -> anyhow::Result<(String, Vec<String>)> {
        let digest = match self.store.find_image(reference)? {
            Some(row) => row.digest,
            None => self.images.resolve(reference).map_err(|_| {
                anyhow::anyhow!(
                    "no image {reference:?}: give a name, a digest or a unique prefix of 6+ hex \
                     digits (`phoenix images` lists them)"
                )
            })?,
        };
        let names = self
            .store
            .images()?
            .into_iter()
            .filter(|i| i.digest == digest)
            .map(|i| i.name)
            .collect();
        Ok((digest, names))
    }
}

pub async fn image(state: &Path, args: ImageArgs) -> anyhow::Result<ExitCode> {
    let local = Local::open(state)?;
    match args.command {
        ImageCommand::Inspect { reference, json } => inspect(&local, &reference, json),
        ImageCommand::Rm { references } => remove(&local, &references),
    }
}

fn inspect(local: &Local, reference: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (digest, names) = local.resolve(reference)?;
    let manifest = local.images.manifest(&digest)?;
    let document = local.images.config_document(&digest)?;
    let files = local.images.files(&digest)?;
    let size = local.images.size_of(&digest)?;
    if json {
        let value = json!({
            "digest": digest,
            "names": names,
            "size": size,
            "created": document.created,
            "architecture": document.architecture,
            "config": document.config,
            "layers": manifest.layers,
            "diff_ids": document.rootfs.diff_ids,
            "annotations": manifest.annotations,
            "files": {"count": files.files.len(), "bytes": files.bytes(), "root": files.root},
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let config = &document.config;
    println!("image      {digest}");
    println!("names      {}", names.join(", "));
    println!(
        "created    {}  ({})",
        document.created, document.architecture
    );
    println!("size       {}", human_size(size));
    println!("entrypoint {:?}  cmd {:?}", config.entrypoint, config.cmd);
    println!("workdir    {}  user {:?}", config.working_dir, config.user);
    for pair in &config.env {
        println!("env        {pair}");
    }
    for (key, value) in &config.labels {
        println!("label      {key}={value}");
    }
    for port in config.exposed_ports.keys() {
        println!("expose     {port}");
    }
    for layer in &manifest.layers {
        println!(
            "layer      {}  {:>9}",
            short_digest(&layer.digest),
            human_size(layer.size)
        );
    }
    println!(
        "files      {} paths, {} in files, Merkle root {}",
        files.files.len(),
        human_size(files.bytes()),
        files.root
    );
    Ok(ExitCode::SUCCESS)
}

fn remove(local: &Local, references: &[String]) -> anyhow::Result<ExitCode> {
    let running: Vec<(String, String)> = local
        .store
        .generations(None)?
        .into_iter()
        .filter(|g| {
            matches!(
                g.status,
                GenerationStatus::Live | GenerationStatus::Starting
            )
        })
        .map(|g| (g.image, g.role))
        .collect();
    for reference in references {
        let (digest, names) = local.resolve(reference)?;
        if let Some((_, role)) = running.iter().find(|(image, _)| *image == digest) {
            bail!(
                "image {} ({}) is running in role {role}: deploy another image first",
                short_digest(&digest),
                names.join(", ")
            );
        }
        local.store.remove_image(&digest)?;
        let now = SystemClock.now_ms();
        local.store.journal(
            now,
            None,
            "image.removed",
            &json!({"digest": digest, "names": names}),
        )?;
        println!(
            "removed {} ({})",
            short_digest(&digest),
            if names.is_empty() {
                "unnamed".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    phoenix_fleet::refresh_index(&local.store, &local.images)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn gc(state: &Path, args: GcArgs) -> anyhow::Result<ExitCode> {
    let local = Local::open(state)?;
    // Every recorded image stays, and so does every generation's (rollback needs them).
    let mut keep: Vec<String> = local
        .store
        .images()?
        .into_iter()
        .map(|i| i.digest)
        .collect();
    keep.extend(
        local
            .store
            .generations(None)?
            .into_iter()
            .map(|g| g.image)
            .filter(|image| local.images.contains(image)),
    );
    let report = local.images.gc(&keep)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "removed {} blobs ({}) and {} unpacked roots",
            report.blobs,
            human_size(report.bytes),
            report.roots
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn export(state: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let local = Local::open(state)?;
    let (digest, names) = local.resolve(&args.reference)?;
    // Its own `name:tag` when it has one, else `name:latest`.
    let tag = match args.tag.clone() {
        Some(tag) => tag,
        None => {
            let name = names.first().cloned().unwrap_or_else(|| "phoenix".into());
            let own = local.store.display_name(&name, &digest)?;
            if own.contains(':') {
                own
            } else {
                format!("{name}:latest")
            }
        }
    };
    let tmp = args.output.with_extension("tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(file);
    local.images.export(&digest, &tag, &mut out)?;
    out.flush()?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let size = std::fs::metadata(&args.output)?.len();
    if args.json {
        let answer = json!({"digest": digest, "ref": tag, "path": args.output, "size": size});
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "exported {} as {tag} to {} ({})",
        short_digest(&digest),
        args.output.display(),
        human_size(size)
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn import(state: &Path, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let local = Local::open(state)?;
    if !args.path.exists() {
        bail!("{} does not exist", args.path.display());
    }
    let imported = local.images.import(&args.path, args.reference.as_deref())?;
    if args.name.is_some() && imported.len() > 1 {
        bail!("--name names one image, but the archive holds several: choose one with --ref");
    }
    let now = SystemClock.now_ms();
    let mut rows = Vec::new();
    for image in &imported {
        let (ref_name, tag) = name_of_ref(&image.name);
        let name = args.name.clone().unwrap_or(ref_name);
        let size = local.images.size_of(&image.digest)?;
        local.store.record_image(&name, &image.digest, size, now)?;
        // The archive's tag comes along (`hello:v2` stays `hello:v2`).
        if let Some(tag) = tag.filter(|t| phoenix_image::check_tag(t).is_ok()) {
            local.store.tag_image(&name, &tag, &image.digest, now)?;
        }
        local.store.journal(
            now,
            None,
            "image.imported",
            &json!({"name": name, "digest": image.digest, "from": args.path}),
        )?;
        rows.push(json!({"name": name, "digest": image.digest, "size": size}));
        if !args.json {
            println!(
                "imported {name} {} ({})",
                short_digest(&image.digest),
                human_size(size)
            );
        }
    }
    phoenix_fleet::refresh_index(&local.store, &local.images)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `localhost/hello:v2` → `hello` and `v2`; an empty ref → `imported`, no tag.
fn name_of_ref(reference: &str) -> (String, Option<String>) {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let (name, tag) = match last.split_once(':') {
        Some((name, tag)) => (name, Some(tag.to_string())),
        None => (last, None),
    };
    if name.is_empty() {
        ("imported".into(), None)
    } else {
        (name.into(), tag)
    }
}

/// The layout of the root an instance of `driver` runs from: the host layout for the process
/// driver; for containers, shifted into the instances' user namespace (or not, for a role with
/// `allow_root`: whichever root exists).
fn root_layout(images: &ImageStore, digest: &str, driver: &str) -> RootLayout {
    if driver == "process" {
        return RootLayout::HOST;
    }
    let mapped = RootLayout::mapped(phoenix_fleet::ID_OFFSET);
    [mapped, RootLayout::mapped(0)]
        .into_iter()
        .find(|layout| images.root_path(digest, *layout).is_ok_and(|p| p.exists()))
        .unwrap_or(mapped)
}

pub async fn drift(state: &Path, args: DriftArgs) -> anyhow::Result<ExitCode> {
    let local = Local::open(state)?;
    let (digest, role, what, driver) = if args.image {
        let (digest, _) = local.resolve(&args.target)?;
        (
            digest,
            None,
            format!("image {}", short_digest(&args.target)),
            "process".to_string(),
        )
    } else {
        let instance = local
            .store
            .active_instances()?
            .into_iter()
            .find(|i| i.name == args.target)
            .with_context(|| {
                format!(
                    "no running instance {:?} (`phoenix status` lists them)",
                    args.target
                )
            })?;
        let generation = local
            .store
            .generation(instance.generation)?
            .context("the instance's generation is not recorded")?;
        (
            generation.image,
            Some(generation.role),
            format!("instance {}", args.target),
            instance.driver,
        )
    };
    let started = Instant::now();
    let images = local.images.clone();
    let layout = root_layout(&images, &digest, &driver);
    let (full, image) = (args.full, digest.clone());
    let drift =
        tokio::task::spawn_blocking(move || images.drift_as(&image, layout, full)).await??;
    let millis = started.elapsed().as_millis();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "target": args.target, "image": digest, "drift": drift, "ms": millis
            }))?
        );
    } else {
        println!(
            "{what} (image {}): {} added, {} changed, {} removed; {} paths checked, {} files hashed, {millis} ms",
            short_digest(&digest),
            drift.added.len(),
            drift.changed.len(),
            drift.removed.len(),
            drift.checked,
            drift.hashed
        );
        for path in &drift.added {
            println!("  + /{path}");
        }
        for change in &drift.changed {
            println!("  ~ /{} ({})", change.path, change.what.join(", "));
        }
        for path in &drift.removed {
            println!("  - /{path}");
        }
    }
    if drift.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    if args.replace {
        let Some(role) = role else {
            bail!("--replace needs an instance, not --image");
        };
        // `phoenix up` journals the drift, unpacks the image again and redeploys it.
        let client = crate::client::Client::new(state, &args.api)?;
        let answer: serde_json::Value = client
            .post_json(&format!("/v1/roles/{role}/heal-drift"), json!({}))
            .await?;
        let report: Option<phoenix_fleet::DeployReport> =
            serde_json::from_value(answer["report"].clone())?;
        match report {
            Some(report) if args.json => println!("{}", serde_json::to_string_pretty(&report)?),
            Some(report) => println!("{}", crate::commands::summary(&report)),
            None => println!("phoenix up found no drift in role {role}'s live root"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemClock.now_ms();
    let detail = json!({
        "target": args.target, "image": digest,
        "added": drift.added.len(), "changed": drift.changed.len(), "removed": drift.removed.len(),
    });
    local
        .store
        .journal(now, role.as_deref(), "image.drifted", &detail)?;
    Ok(ExitCode::FAILURE)
}

/// Bake progress on stderr: a bar per step on a terminal (bytes while a layer is written),
/// plain lines otherwise.
pub struct BakeProgress {
    name: String,
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    started: Instant,
}

impl BakeProgress {
    pub fn new(name: &str) -> Self {
        BakeProgress {
            name: name.into(),
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }
}

impl phoenix_image::Progress for BakeProgress {
    fn step(&mut self, index: usize, total: usize, what: &str) {
        let label = format!("{} [{index}/{total}] {what}", self.name);
        if self.terminal {
            let bar = indicatif::ProgressBar::new_spinner().with_message(label);
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            self.bar = Some(bar);
        } else {
            eprintln!("[{:>6.1}s] {label}", self.started.elapsed().as_secs_f64());
        }
    }

    fn advance(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            if bar.length() != Some(total) {
                bar.set_length(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
            }
            bar.set_position(done);
        }
    }

    fn finished(&mut self, report: &StepReport) {
        let how = if report.cached { "cached" } else { "built" };
        let line = format!(
            "{} {} ({how}, {} ms)",
            self.name, report.what, report.millis
        );
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("  {line}");
    }

    fn line(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("  | {line}")),
            None => eprintln!("  | {line}"),
        }
    }
}
