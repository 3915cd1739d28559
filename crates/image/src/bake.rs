//! Baking a recipe: the base, then one layer per step, each looked up in the layer cache
//! before any work; then the config, the file manifest and the manifest. A bake that fails
//! removes every blob and cache record it created, so the store is as it was.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::cache::{LayerCache, StatCache, layer_key};
use crate::files::{FileKind, FileManifest, MEDIA_FILES};
use crate::gzip::ParallelGzip;
use crate::hashing::HashingWriter;
use crate::layer::{LayerPlan, LayerRecord, image_path};
use crate::oci::{self, ConfigDocument, Descriptor, ImageConfig, Manifest, RootFs};
use crate::run::{RunPlace, run_step};
use crate::store::{ANNOTATION_FILES, ANNOTATION_FILES_ROOT, to_json};
use crate::unpack::{RootLayout, remove_path};
use crate::{Base, ImageError, ImageStore, Recipe, Step};

/// Inputs of a bake that do not come from the recipe.
#[derive(Debug, Clone, Default)]
pub struct BakeOptions {
    /// The mtime of every file and the image's `created` time (`SOURCE_DATE_EPOCH`; default 0).
    pub mtime: u64,
    /// The program that confines `run` steps (`phoenix` itself, as its bake-step helper:
    /// `pivot_root`, Docker's capabilities, `no_new_privs`, seccomp). Without one, a step
    /// runs in its namespaces only.
    pub sandbox: Option<PathBuf>,
    /// With the sandbox, the host uid and gid of a `run` step's root: the step runs in a user
    /// namespace mapping 65,536 ids from there, and its files are written to the layer with
    /// their owners inside. 0: no user namespace.
    pub step_id_offset: u32,
}

/// Where a bake reports what it does (a progress bar, log lines, or nothing).
pub trait Progress {
    /// Step `index` (from 1) of `total` starts.
    fn step(&mut self, _index: usize, _total: usize, _what: &str) {}
    /// Bytes of the step's layer written so far, of `total`.
    fn advance(&mut self, _done: u64, _total: u64) {}
    /// The step ended.
    fn finished(&mut self, _report: &StepReport) {}
    /// A line of a command's output (a `run` step, mmdebstrap).
    fn line(&mut self, _line: &str) {}
}

/// Reports nothing.
impl Progress for () {}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepReport {
    pub what: String,
    /// True when the layer came from the cache (or the step has no layer).
    pub cached: bool,
    #[serde(rename = "duration_ms")]
    pub millis: u64,
    /// The layer's digest, when the step makes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// The result of a bake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakedImage {
    /// `sha256:…` of the manifest: the image's identity.
    pub digest: String,
    pub config: ImageConfig,
    /// Bytes of manifest, config, layers and file manifest together.
    pub size: u64,
    pub steps: Vec<StepReport>,
    /// Number of paths in the image and the Merkle root of its file manifest.
    pub files: usize,
    pub files_root: String,
    /// What would keep the image from starting in a container (its entrypoint's interpreter
    /// or libraries are not in it). Found on the bake that makes the image.
    pub warnings: Vec<String>,
}

/// The image as built so far.
pub(crate) struct State {
    key: String,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
    files: FileManifest,
    config: ImageConfig,
}

/// Paths this bake created, removed again if it fails.
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Created {
    fn undo(self) {
        for path in self.0.into_iter().rev() {
            let _ = fs::remove_file(path);
        }
    }
}

impl ImageStore {
    /// Bakes `recipe`, reading sources relative to `context`.
    pub fn bake(
        &self,
        recipe: &Recipe,
        context: &Path,
        options: BakeOptions,
    ) -> Result<BakedImage, ImageError> {
        self.bake_with(recipe, context, options, &mut ())
    }

    /// Bakes `recipe`, telling `progress` about each step.
    pub fn bake_with(
        &self,
        recipe: &Recipe,
        context: &Path,
        options: BakeOptions,
        progress: &mut dyn Progress,
    ) -> Result<BakedImage, ImageError> {
        let context = match &recipe.context {
            Some(dir) => context.join(dir),
            None => context.to_path_buf(),
        };
        if !context.is_dir() {
            return Err(ImageError::MissingSource {
                path: context.clone(),
                context: "the fleet file's directory (`context`)".into(),
            });
        }
        let mut baker = Baker {
            store: self,
            context: &context,
            options,
            progress,
            created: Created::default(),
            cache: self.layer_cache(),
            reports: Vec::new(),
        };
        match baker.bake(recipe) {
            Ok(image) => Ok(image),
            Err(error) => {
                baker.created.undo();
                Err(error)
            }
        }
    }
}

pub(crate) struct Baker<'a> {
    pub store: &'a ImageStore,
    pub context: &'a Path,
    pub options: BakeOptions,
    pub progress: &'a mut dyn Progress,
    created: Created,
    cache: LayerCache,
    reports: Vec<StepReport>,
}

impl Baker<'_> {
    fn bake(&mut self, recipe: &Recipe) -> Result<BakedImage, ImageError> {
        let steps: Vec<Step> = recipe.layer_steps().collect();
        let total = steps.len() + 1;
        let mut state = self.timed(1, total, &describe_base(&recipe.from), |b| {
            b.base(&recipe.from)
        })?;
        add_env(&mut state.config, recipe);
        for (i, step) in steps.iter().enumerate() {
            let what = describe_step(step);
            state = self.timed(i + 2, total, &what, |b| b.step(&state, step))?;
        }
        self.finish(recipe, state)
    }

    /// Runs one step with progress and a report.
    fn timed<T>(
        &mut self,
        index: usize,
        total: usize,
        what: &str,
        work: impl FnOnce(&mut Self) -> Result<(T, Option<String>, bool), ImageError>,
    ) -> Result<T, ImageError> {
        self.progress.step(index, total, what);
        let started = Instant::now();
        let (value, layer, cached) = work(self)?;
        let report = StepReport {
            what: what.into(),
            cached,
            millis: started.elapsed().as_millis() as u64,
            layer,
        };
        self.progress.finished(&report);
        self.reports.push(report);
        Ok(value)
    }

    fn step(&mut self, below: &State, step: &Step) -> StepResult {
        let (key, record, cached) = match step {
            Step::Copy(copy) => {
                let mut hashes = self.stat_cache(&self.context.join(&copy.src));
                let plan = LayerPlan::copy(copy, self.context, &below.files, &mut hashes)?;
                let key = layer_key(&below.key, &(("copy", copy), ("files", plan.files())));
                let (record, cached) = match self.cached(&key) {
                    Some(record) => (record, true),
                    None => (self.write_layer(&key, &plan)?, false),
                };
                hashes.save();
                (key, record, cached)
            }
            Step::Run(run) => {
                let key = layer_key(
                    &below.key,
                    &json!({"run": run, "env": below.config.env, "workdir": below.config.working_dir}),
                );
                match self.cached(&key) {
                    Some(record) => (key, record, true),
                    None => {
                        let record = self.run_layer(&key, below, run)?;
                        (key, record, false)
                    }
                }
            }
        };
        let layer = record.digest.clone();
        Ok((below.on_top(key, record), Some(layer), cached))
    }

    fn run_layer(
        &mut self,
        key: &str,
        below: &State,
        run: &crate::RunStep,
    ) -> Result<LayerRecord, ImageError> {
        let scratch = self.store.scratch("run")?;
        let result = (|| {
            let lower = scratch.join("lower");
            fs::create_dir_all(&lower).map_err(ImageError::io("create", &lower))?;
            let sandbox = self.options.sandbox.as_deref();
            // In a user namespace the step sees owners as they are minus the offset: the root
            // below it is laid out shifted, and its changes are shifted back into the layer.
            let id_offset = match sandbox {
                Some(_) => self.options.step_id_offset,
                None => 0,
            };
            let layout = match id_offset {
                0 => RootLayout::FAITHFUL,
                offset => RootLayout::mapped(offset),
            };
            self.store.apply_layers_as(&below.layers, &lower, layout)?;
            let place = RunPlace {
                lower: &lower,
                scratch: &scratch,
                id_offset,
            };
            let workdir = match below.config.working_dir.as_str() {
                "" => "/",
                dir => dir,
            };
            let progress = &mut *self.progress;
            let upper = run_step(
                run,
                &place,
                &below.config.env,
                workdir,
                sandbox,
                &mut |line| progress.line(line),
            )?;
            let plan = LayerPlan::tree(&upper, &mut StatCache::none(), true)?.unshifted(id_offset);
            self.write_layer(key, &plan)
        })();
        remove_path(&scratch);
        result
    }

    /// A layer from the tree at `root` (a base directory, an unpacked tar).
    pub(crate) fn tree_layer(
        &mut self,
        key: &str,
        root: &Path,
        hashes: &mut StatCache,
    ) -> Result<LayerRecord, ImageError> {
        let plan = LayerPlan::tree(root, hashes, false)?;
        self.write_layer(key, &plan)
    }

    pub(crate) fn cached(&self, key: &str) -> Option<LayerRecord> {
        self.cache
            .get(key)
            .filter(|record| self.store.contains(&record.digest))
    }

    /// The stat cache for sources under `path`.
    pub(crate) fn stat_cache(&self, path: &Path) -> StatCache {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let name = crate::sha256_digest(absolute.as_os_str().as_encoded_bytes());
        let dir = self.store.cache_dir().join("stat");
        let _ = fs::create_dir_all(&dir);
        StatCache::load(dir.join(name.trim_start_matches("sha256:")))
    }

    /// Writes `plan` as a tar+gzip blob and records it in the layer cache under `key`.
    pub(crate) fn write_layer(
        &mut self,
        key: &str,
        plan: &LayerPlan,
    ) -> Result<LayerRecord, ImageError> {
        let blobs = self.store.blobs_dir();
        let tmp = blobs.join(format!(
            ".tmp-layer-{}-{}",
            std::process::id(),
            crate::store::unique()
        ));
        let result = self.write_layer_to(&tmp, plan);
        let (digest, diff_id, size) = match result {
            Ok(done) => done,
            Err(error) => {
                let _ = fs::remove_file(&tmp);
                return Err(error);
            }
        };
        let path = self.store.blob_path(&digest)?;
        if path.exists() {
            let _ = fs::remove_file(&tmp);
        } else {
            fs::rename(&tmp, &path).map_err(ImageError::io("store", &path))?;
            self.created.0.push(path);
        }
        let record = LayerRecord {
            digest,
            diff_id,
            size,
            files: plan.files(),
        };
        self.cache.put(key, &record)?;
        self.created.0.push(self.cache.path(key));
        Ok(record)
    }

    fn write_layer_to(
        &mut self,
        tmp: &Path,
        plan: &LayerPlan,
    ) -> Result<(String, String, u64), ImageError> {
        let file = fs::File::create(tmp).map_err(ImageError::io("create", tmp))?;
        let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let gzip = ParallelGzip::new(compressed);
        let total = plan.bytes();
        let mut done = 0;
        let progress = &mut *self.progress;
        let plain = plan.write_tar(HashingWriter::new(gzip), self.options.mtime, &mut |n| {
            done += n;
            progress.advance(done, total);
        })?;
        let (gzip, diff_id, _) = plain.finish();
        let compressed = gzip.finish().map_err(ImageError::io("compress", tmp))?;
        let (mut file, digest, size) = compressed.finish();
        file.flush().map_err(ImageError::io("write", tmp))?;
        Ok((digest, diff_id, size))
    }

    /// Stores a small blob, remembering it when it is new.
    fn blob(&mut self, bytes: &[u8], media_type: &str) -> Result<Descriptor, ImageError> {
        let (descriptor, new) = self.store.write_blob(bytes, media_type)?;
        if new {
            self.created
                .0
                .push(self.store.blob_path(&descriptor.digest)?);
        }
        Ok(descriptor)
    }

    fn finish(&mut self, recipe: &Recipe, mut state: State) -> Result<BakedImage, ImageError> {
        state.files.root = crate::files::merkle_root(&state.files.files);
        let config = final_config(recipe, state.config);
        check_entrypoint(&config, &state.files)?;
        let files_desc = self.blob(&to_json(&state.files)?, MEDIA_FILES)?;
        let document = ConfigDocument {
            architecture: oci::oci_architecture().into(),
            config: config.clone(),
            created: oci::rfc3339(self.options.mtime),
            os: "linux".into(),
            rootfs: RootFs {
                diff_ids: state.diff_ids,
                kind: "layers".into(),
            },
        };
        let config_desc = self.blob(&to_json(&document)?, oci::MEDIA_CONFIG)?;
        let manifest = Manifest {
            annotations: [
                (ANNOTATION_FILES.to_string(), files_desc.digest.clone()),
                (ANNOTATION_FILES_ROOT.to_string(), state.files.root.clone()),
            ]
            .into(),
            config: config_desc,
            layers: state.layers,
            media_type: oci::MEDIA_MANIFEST.into(),
            schema_version: 2,
        };
        let manifest_bytes = to_json(&manifest)?;
        let new = !self.store.contains(&crate::sha256_digest(&manifest_bytes));
        let warnings = match new {
            true => self.entrypoint_warnings(&config, &manifest.layers, &state.files),
            false => Vec::new(),
        };
        let manifest_desc = self.blob(&manifest_bytes, oci::MEDIA_MANIFEST)?;
        let size = manifest_desc.size
            + manifest.config.size
            + files_desc.size
            + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        Ok(BakedImage {
            digest: manifest_desc.digest,
            config,
            size,
            steps: std::mem::take(&mut self.reports),
            files: state.files.files.len(),
            files_root: state.files.root,
            warnings,
        })
    }

    /// Why the entrypoint could not start inside the image: an ELF interpreter, a library or
    /// a script's interpreter that is not in it.
    fn entrypoint_warnings(
        &self,
        config: &ImageConfig,
        layers: &[Descriptor],
        files: &FileManifest,
    ) -> Vec<String> {
        let Some(program) = config.entrypoint.first().or(config.cmd.first()) else {
            return Vec::new();
        };
        let path = match program.starts_with('/') {
            true => Some(program.clone()),
            false => search_path(config, program, files),
        };
        let Some(path) = path else {
            return vec![format!(
                "the entrypoint {program:?} is not on the image's PATH: it cannot start"
            )];
        };
        let Some(file) = crate::elf::file_behind(files, &path) else {
            return Vec::new();
        };
        let Some(bytes) = self.store.file_in_layers(layers, &file) else {
            return Vec::new();
        };
        let Some(needs) = crate::elf::needs(&bytes) else {
            return Vec::new();
        };
        let missing = crate::elf::missing(&needs, &path, files);
        if missing.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "the entrypoint {path} needs {} which the image does not have: it would start on \
             this host but not in a container. Copy it with `libraries = true`, build it \
             statically, or start from a base that has them",
            missing.join(", ")
        )]
    }
}

/// Where a relative entrypoint is found on the image's `PATH` (its default when unset).
fn search_path(config: &ImageConfig, program: &str, files: &FileManifest) -> Option<String> {
    let path = config
        .env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .find(|candidate| crate::elf::exists(files, candidate))
}

impl State {
    pub(crate) fn empty(key: String) -> State {
        State {
            key,
            layers: Vec::new(),
            diff_ids: Vec::new(),
            files: FileManifest::merge([]),
            config: ImageConfig::default(),
        }
    }

    /// The state of an image already in the store.
    pub(crate) fn of_image(
        store: &ImageStore,
        key: String,
        digest: &str,
    ) -> Result<State, ImageError> {
        let manifest = store.manifest(digest)?;
        let document = store.config_document(digest)?;
        Ok(State {
            key,
            layers: manifest.layers,
            diff_ids: document.rootfs.diff_ids,
            files: store.files(digest)?,
            config: document.config,
        })
    }

    /// This state with one more layer.
    pub(crate) fn on_top(&self, key: String, record: LayerRecord) -> State {
        // The Merkle root is computed once, when the image is finished.
        let files = FileManifest::merge_without_root([
            self.files.files.as_slice(),
            record.files.as_slice(),
        ]);
        let mut layers = self.layers.clone();
        layers.push(Descriptor::new(
            record.digest,
            oci::MEDIA_LAYER,
            record.size,
        ));
        let mut diff_ids = self.diff_ids.clone();
        diff_ids.push(record.diff_id);
        State {
            key,
            layers,
            diff_ids,
            files,
            config: self.config.clone(),
        }
    }
}

/// A step's new state, its layer's digest, and whether it came from the cache.
pub(crate) type StepResult = Result<(State, Option<String>, bool), ImageError>;

/// The recipe's environment on top of the base's: a key already set keeps its place.
fn add_env(config: &mut ImageConfig, recipe: &Recipe) {
    for (key, value) in &recipe.env {
        let pair = format!("{key}={value}");
        match config
            .env
            .iter_mut()
            .find(|p| p.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(existing) => *existing = pair,
            None => config.env.push(pair),
        }
    }
}

fn final_config(recipe: &Recipe, mut config: ImageConfig) -> ImageConfig {
    if let Some(entrypoint) = &recipe.entrypoint {
        config.entrypoint = entrypoint.clone();
        // As Docker does: a new entrypoint drops the base's arguments.
        config.cmd = Vec::new();
    }
    if let Some(cmd) = &recipe.cmd {
        config.cmd = cmd.clone();
    }
    if let Some(workdir) = &recipe.workdir {
        config.working_dir = workdir.clone();
    }
    if config.working_dir.is_empty() {
        config.working_dir = "/".into();
    }
    if let Some(user) = &recipe.user {
        config.user = user.clone();
    }
    config.labels.extend(recipe.labels.clone());
    for port in &recipe.expose {
        let port = if port.contains('/') {
            port.clone()
        } else {
            format!("{port}/tcp")
        };
        config.exposed_ports.insert(port, oci::Empty {});
    }
    config
}

/// An image must say what to run, and an absolute program must be in it.
fn check_entrypoint(config: &ImageConfig, files: &FileManifest) -> Result<(), ImageError> {
    let program = config.entrypoint.first().or(config.cmd.first());
    let Some(program) = program else {
        return Err(ImageError::NoEntrypoint);
    };
    if !program.starts_with('/') {
        return Ok(());
    }
    let path = image_path(program)?;
    match files.get(&path) {
        Some(entry) if matches!(entry.kind, FileKind::File | FileKind::Symlink) => Ok(()),
        _ => Err(ImageError::BadPath {
            path: program.clone(),
            why: "the entrypoint is not in the image: add a `copy` step that puts it there",
        }),
    }
}

fn describe_base(base: &Base) -> String {
    match base {
        Base::Scratch => "from scratch".into(),
        Base::Image(name) => format!("from image {name}"),
        Base::Dir(dir) => format!("from directory {dir}"),
        Base::Tar(tar) => format!("from tar {tar}"),
        Base::Oci { path, .. } => format!("from OCI {path}"),
        Base::Debian(debian) => format!(
            "from debian {} (mmdebstrap, {} packages)",
            debian.debian,
            debian.packages.len()
        ),
    }
}

fn describe_step(step: &Step) -> String {
    match step {
        Step::Copy(copy) => format!("copy {} -> {}", copy.src, copy.dst),
        Step::Run(run) => format!("run {}", run.run.argv().join(" ")),
    }
}
