//! The base of a bake: scratch, an image in the store, an OCI archive, a directory, a tar
//! file, or a Debian root built by mmdebstrap. Each is keyed like a layer, so an unchanged
//! base costs a lookup.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::bake::{Baker, State, StepResult};
use crate::cache::{StatCache, layer_key};
use crate::unpack::{Limits, RootLayout, Unpacker, remove_path};
use crate::{Base, DebianBase, ImageError};

impl Baker<'_> {
    pub(crate) fn base(&mut self, base: &Base) -> StepResult {
        match base {
            Base::Scratch => Ok((State::empty(layer_key("", &"scratch")), None, true)),
            Base::Image(reference) => {
                let digest = self.store.resolve(reference).map_err(|_| {
                    ImageError::NotFound(format!(
                        "{reference} (the base image: bake it first, or give its digest)"
                    ))
                })?;
                self.image_base(&digest)
            }
            Base::Oci { path, reference } => {
                let path = self.context.join(path);
                if !path.exists() {
                    return Err(self.missing(&path));
                }
                // An archive already imported (same content, same ref) is not read again.
                let remembered = self.oci_memo(&path, reference.as_deref())?;
                if let Some(digest) = remembered.recall(self.store) {
                    return self.image_base(&digest);
                }
                let imported = self.store.import(&path, reference.as_deref())?;
                match imported.as_slice() {
                    [one] => {
                        remembered.keep(&one.digest);
                        self.image_base(&one.digest)
                    }
                    _ => Err(ImageError::NotOci {
                        path,
                        why: format!(
                            "it holds {} images: say which with `ref` ({})",
                            imported.len(),
                            imported
                                .iter()
                                .map(|i| i.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }),
                }
            }
            Base::Dir(dir) => {
                let dir = self.context.join(dir);
                if !dir.is_dir() {
                    return Err(self.missing(&dir));
                }
                let mut hashes = self.stat_cache(&dir);
                let plan = crate::layer::LayerPlan::tree(&dir, &mut hashes, false)?;
                let key = layer_key("", &("dir", plan.files()));
                let (record, cached) = match self.cached(&key) {
                    Some(record) => (record, true),
                    None => (self.write_layer(&key, &plan)?, false),
                };
                hashes.save();
                self.layered(key, record, cached)
            }
            Base::Tar(tar) => {
                let tar = self.context.join(tar);
                let meta = fs::metadata(&tar).map_err(|_| self.missing(&tar))?;
                let mut hashes = self.stat_cache(&tar);
                let sha256 = hashes.sha256(&tar, &meta)?;
                hashes.save();
                let key = layer_key("", &json!({"tar": sha256}));
                self.unpacked_base(key, |_, into| unpack_tar(&tar, into))
            }
            Base::Debian(debian) => {
                let key = layer_key(
                    "",
                    &json!({"debian": debian, "arch": crate::oci::oci_architecture(),
                            "mtime": self.options.mtime}),
                );
                let debian = debian.clone();
                self.unpacked_base(key, move |baker, into| baker.mmdebstrap(&debian, into))
            }
        }
    }

    /// Where the manifest digest imported from the OCI archive or layout at `path` is kept,
    /// keyed by its content (an archive's sha256 through the stat cache; a layout's
    /// `index.json`, whose blobs are content-addressed) and `reference`.
    fn oci_memo(&self, path: &Path, reference: Option<&str>) -> Result<OciMemo, ImageError> {
        let index = if path.is_dir() {
            path.join("index.json")
        } else {
            path.to_path_buf()
        };
        let meta = fs::metadata(&index).map_err(|_| self.missing(&index))?;
        let mut hashes = self.stat_cache(&index);
        let content = hashes.sha256(&index, &meta)?;
        hashes.save();
        let key = layer_key("", &("oci", content, reference));
        let dir = self.store.cache_dir().join("oci");
        Ok(OciMemo(dir.join(key.trim_start_matches("sha256:"))))
    }

    fn image_base(&mut self, digest: &str) -> StepResult {
        let key = layer_key("", &json!({"image": digest}));
        Ok((State::of_image(self.store, key, digest)?, None, true))
    }

    fn layered(
        &mut self,
        key: String,
        record: crate::layer::LayerRecord,
        cached: bool,
    ) -> StepResult {
        let layer = record.digest.clone();
        Ok((
            State::empty(String::new()).on_top(key, record),
            Some(layer),
            cached,
        ))
    }

    /// A base whose root is made in a scratch directory by `make`, on a cache miss.
    fn unpacked_base(
        &mut self,
        key: String,
        make: impl FnOnce(&mut Self, &Path) -> Result<(), ImageError>,
    ) -> StepResult {
        if let Some(record) = self.cached(&key) {
            return self.layered(key, record, true);
        }
        let scratch = self.store.scratch("base")?;
        let root = scratch.join("root");
        let result = fs::create_dir_all(&root)
            .map_err(ImageError::io("create", &root))
            .and_then(|()| make(self, &root))
            .and_then(|()| self.tree_layer(&key, &root, &mut StatCache::none()));
        remove_path(&scratch);
        self.layered(key, result?, false)
    }

    fn missing(&self, path: &Path) -> ImageError {
        ImageError::MissingSource {
            path: path.to_path_buf(),
            context: self.context.to_path_buf(),
        }
    }

    /// Builds a Debian root with mmdebstrap into `into` (through a tar, which mmdebstrap
    /// writes with `SOURCE_DATE_EPOCH` mtimes and without machine-specific files).
    fn mmdebstrap(&mut self, debian: &DebianBase, into: &Path) -> Result<(), ImageError> {
        let tar = into.with_extension("tar");
        let mut command = Command::new("mmdebstrap");
        command
            .arg(format!("--variant={}", debian.variant))
            .arg("--format=tar")
            .arg("--quiet");
        if !debian.packages.is_empty() {
            command.arg(format!("--include={}", debian.packages.join(",")));
        }
        command.arg(&debian.debian).arg(&tar);
        if let Some(mirror) = &debian.mirror {
            command.arg(mirror);
        }
        command.env("SOURCE_DATE_EPOCH", self.options.mtime.to_string());
        let shown = format!("mmdebstrap {}", debian.debian);
        let progress = &mut *self.progress;
        crate::run::run_logged(
            command,
            "mmdebstrap (apt-get install mmdebstrap)",
            &shown,
            Some(crate::RunStep::DEFAULT_TIMEOUT),
            &mut |line| progress.line(line),
        )?;
        let result = unpack_tar(&tar, into);
        let _ = fs::remove_file(&tar);
        result
    }
}

/// Unpacks a root file system tar (plain or gzip) with its modes and numeric owners, every
/// entry resolved inside `into`.
fn unpack_tar(tar: &Path, into: &Path) -> Result<(), ImageError> {
    let mut file = BufReader::new(fs::File::open(tar).map_err(ImageError::io("open", tar))?);
    let gzip = file
        .fill_buf()
        .map_err(ImageError::io("read", tar))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut unpacker = Unpacker::new(into, RootLayout::FAITHFUL, Limits::default())?;
    unpacker.apply(reader, &tar.display().to_string())?;
    unpacker.finish()
}

/// The manifest digest an OCI base was imported as.
struct OciMemo(std::path::PathBuf);

impl OciMemo {
    /// The remembered digest, when that image is still in the store.
    fn recall(&self, store: &crate::ImageStore) -> Option<String> {
        let digest = fs::read_to_string(&self.0).ok()?;
        store
            .contains(digest.trim())
            .then(|| digest.trim().to_string())
    }

    /// Remembers `digest` (best effort: it is only a cache).
    fn keep(&self, digest: &str) {
        if let Some(dir) = self.0.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = crate::store::write_atomic(&self.0, digest.as_bytes());
    }
}
