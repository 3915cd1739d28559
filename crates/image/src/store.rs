//! The image store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), the
//! bake caches, and unpacked, read-only roots that instances run from.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ImageError;
use crate::cache::LayerCache;
use crate::files::{FileEntry, FileManifest};
use crate::hashing::HashingReader;
use crate::oci::{self, ConfigDocument, Descriptor, ImageConfig, Index, Manifest};
use crate::unpack::{Limits, RootLayout, Unpacker, remove_path};

/// The manifest annotation naming the blob that holds the image's file manifest.
pub const ANNOTATION_FILES: &str = "dev.phoenix.files";
/// The manifest annotation holding the file manifest's Merkle root.
pub const ANNOTATION_FILES_ROOT: &str = "dev.phoenix.files.root";
pub const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";

/// A content-addressed OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    limits: Limits,
}

/// One image named in `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRef {
    pub name: String,
    pub digest: String,
}

/// What `gc` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub blobs: usize,
    pub bytes: u64,
    pub roots: usize,
}

impl ImageStore {
    /// Opens (creating if needed) the store rooted at `root`, and clears what a crashed bake
    /// left in its scratch directory. Layers may expand to `PHOENIX_MAX_LAYER_SIZE` (16 GiB).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        // Absolute, because instances resolve their entrypoint after changing directory.
        let root = root.into();
        let root = std::path::absolute(&root).map_err(ImageError::io("resolve", &root))?;
        let store = ImageStore {
            root,
            limits: Limits::from_env()?,
        };
        for dir in [store.blobs_dir(), store.roots_dir(), store.scratch_dir()] {
            fs::create_dir_all(&dir).map_err(ImageError::io("create", &dir))?;
        }
        // Images, unpacked roots (set-id files included) and scratch trees are the owner's
        // alone: runtimes reach a root through its overlay, never by this path.
        for dir in [store.root.clone(), store.roots_dir(), store.scratch_dir()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(ImageError::io("chmod", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.root.join("index.json").exists() {
            store.write_index(&[])?;
        }
        store.clean_scratch();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same store with other limits on what a layer may expand to.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn roots_dir(&self) -> PathBuf {
        self.root.join("roots")
    }

    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub(crate) fn layer_cache(&self) -> LayerCache {
        LayerCache::new(self.cache_dir().join("layers"))
    }

    /// A fresh, empty scratch directory for one piece of work; the caller removes it.
    pub(crate) fn scratch(&self, what: &str) -> Result<PathBuf, ImageError> {
        let dir = self
            .scratch_dir()
            .join(format!("{what}-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir).map_err(ImageError::io("create", &dir))?;
        Ok(dir)
    }

    fn scratch_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Removes scratch directories of processes that are gone (a crash mid-bake); those of
    /// running processes, even another Phoenix's, stay.
    pub fn clean_scratch(&self) {
        let Ok(entries) = fs::read_dir(self.scratch_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                remove_path(&entry.path());
            }
        }
    }

    /// The file that holds blob `digest`; refuses anything but `sha256:` and 64 hex digits.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest)?;
        Ok(self.blobs_dir().join(hex))
    }

    /// True when the manifest `digest` is in the store.
    pub fn contains(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    /// Stores `bytes` as a blob; returns its descriptor and whether it was new.
    pub(crate) fn write_blob(
        &self,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(Descriptor, bool), ImageError> {
        let digest = crate::sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        let new = !path.exists();
        if new {
            write_atomic(&path, bytes)?;
        }
        Ok((Descriptor::new(digest, media_type, bytes.len() as u64), new))
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound(digest.to_string()),
            _ => ImageError::Io {
                action: "read",
                path: path.clone(),
                cause: e,
            },
        })?;
        crate::expect_digest(digest, crate::sha256_digest(&bytes))?;
        Ok(bytes)
    }

    /// The manifest of image `digest`.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, ImageError> {
        parse("manifest", &self.read_blob(digest)?)
    }

    /// The whole config document of image `digest`.
    pub fn config_document(&self, digest: &str) -> Result<ConfigDocument, ImageError> {
        let manifest = self.manifest(digest)?;
        parse("config", &self.read_blob(&manifest.config.digest)?)
    }

    /// The run configuration of image `digest`.
    pub fn config(&self, digest: &str) -> Result<ImageConfig, ImageError> {
        Ok(self.config_document(digest)?.config)
    }

    /// The file manifest of image `digest`: the blob its manifest names, else (an imported
    /// image) the one computed from its layers on first use.
    pub fn files(&self, digest: &str) -> Result<FileManifest, ImageError> {
        let manifest = self.manifest(digest)?;
        if let Some(files) = manifest.annotations.get(ANNOTATION_FILES)
            && self.contains(files)
        {
            return parse("file manifest", &self.read_blob(files)?);
        }
        let side = self.cache_dir().join("files").join(digest_hex(digest)?);
        if let Ok(bytes) = fs::read(&side)
            && let Ok(files) = serde_json::from_slice(&bytes)
        {
            return Ok(files);
        }
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            layers.push(self.layer_files(layer)?);
        }
        let files = FileManifest::merge(layers.iter().map(Vec::as_slice));
        fs::create_dir_all(side.parent().expect("has parent"))
            .map_err(ImageError::io("create", &side))?;
        write_atomic(&side, &to_json(&files)?)?;
        Ok(files)
    }

    /// The entries of one layer blob, with content hashes, read from the blob.
    pub(crate) fn layer_files(&self, layer: &Descriptor) -> Result<Vec<FileEntry>, ImageError> {
        let path = self.blob_path(&layer.digest)?;
        let file = fs::File::open(&path).map_err(|_| ImageError::NotFound(layer.digest.clone()))?;
        crate::archive::tar_entries(
            decompressor(&layer.media_type, io::BufReader::new(file))?,
            &path,
        )
    }

    /// The images `index.json` names.
    pub fn refs(&self) -> Result<Vec<ImageRef>, ImageError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(ImageError::io("read", &path))?;
        let index: Index = parse("index.json", &bytes)?;
        Ok(index
            .manifests
            .into_iter()
            .map(|d| ImageRef {
                name: d
                    .annotations
                    .get(ANNOTATION_REF)
                    .cloned()
                    .unwrap_or_default(),
                digest: d.digest,
            })
            .collect())
    }

    /// The digest `reference` names: a name in `index.json`, a digest, or a prefix of 6 or
    /// more hex digits of one image in the store.
    pub fn resolve(&self, reference: &str) -> Result<String, ImageError> {
        let refs = self.refs()?;
        if let Some(r) = refs.iter().find(|r| r.name == reference) {
            return Ok(r.digest.clone());
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() == 64 && self.contains(&format!("sha256:{hex}")) {
            return Ok(format!("sha256:{hex}"));
        }
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: BTreeSet<&String> = refs
                .iter()
                .map(|r| &r.digest)
                .filter(|d| d.trim_start_matches("sha256:").starts_with(hex))
                .collect();
            if matches.len() == 1 {
                return Ok(matches.into_iter().next().unwrap().clone());
            }
        }
        Err(ImageError::NotFound(reference.to_string()))
    }

    /// The unpacked root of image `digest` in the host layout (no write or set-id bits, owners
    /// as in the image): what the process driver runs from.
    pub fn unpack(&self, digest: &str) -> Result<PathBuf, ImageError> {
        self.unpack_as(digest, RootLayout::HOST)
    }

    /// The unpacked root of image `digest` in `layout`, unpacking it first if needed. Roots are
    /// shared by every instance of the image and never written by them.
    pub fn unpack_as(&self, digest: &str, layout: RootLayout) -> Result<PathBuf, ImageError> {
        let target = self.root_path(digest, layout)?;
        if target.exists() {
            return Ok(target);
        }
        let tmp = self.scratch("root")?;
        let result = self
            .materialize(digest, &tmp, layout)
            .and_then(|()| {
                // Drift compares ctimes with this stamp: nothing after it is what we wrote.
                let stamp = Stamp {
                    ctime: newest_ctime(&tmp)?,
                    owners: crate::unpack::is_root(),
                };
                write_atomic(&stamp_path(&target), &to_json(&stamp)?)
            })
            .and_then(|()| {
                // Renaming a directory to another parent needs write access to it: the root's
                // own mode comes after.
                fs::rename(&tmp, &target)
                    .or_else(|e| if target.exists() { Ok(()) } else { Err(e) })
                    .map_err(ImageError::io("store", &target))
            })
            .and_then(|()| {
                let mode = layout.mode(0o755);
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(ImageError::io("chmod", &target))
            });
        if tmp.exists() {
            remove_path(&tmp);
        }
        result.map(|()| target)
    }

    /// Where the root of `digest` in `layout` is (or would be) unpacked.
    pub fn root_path(&self, digest: &str, layout: RootLayout) -> Result<PathBuf, ImageError> {
        Ok(self.roots_dir().join(layout.dir_name(digest_hex(digest)?)))
    }

    /// Applies every layer of image `digest` to the empty directory `into`.
    pub(crate) fn materialize(
        &self,
        digest: &str,
        into: &Path,
        layout: RootLayout,
    ) -> Result<(), ImageError> {
        self.apply_layers_as(&self.manifest(digest)?.layers, into, layout)
    }

    pub(crate) fn apply_layers_as(
        &self,
        layers: &[Descriptor],
        into: &Path,
        layout: RootLayout,
    ) -> Result<(), ImageError> {
        let mut unpacker = Unpacker::new(into, layout, self.limits)?;
        if layout.id_offset > 0 {
            std::os::unix::fs::chown(into, Some(layout.id_offset), Some(layout.id_offset))
                .map_err(ImageError::io("chown", into))?;
        }
        for layer in layers {
            let path = self.blob_path(&layer.digest)?;
            let file =
                fs::File::open(&path).map_err(|_| ImageError::NotFound(layer.digest.clone()))?;
            let mut reader = HashingReader::new(io::BufReader::new(file));
            unpacker.apply(decompressor(&layer.media_type, &mut reader)?, &layer.digest)?;
            io::copy(&mut reader, &mut io::sink()).map_err(ImageError::io("read", &path))?;
            crate::expect_digest(&layer.digest, reader.digest())?;
        }
        unpacker.finish()
    }

    /// How the host-layout root of `digest` differs from the image's file manifest.
    pub fn drift(&self, digest: &str, full: bool) -> Result<crate::Drift, ImageError> {
        self.drift_as(digest, RootLayout::HOST, full)
    }

    /// How the root of `digest` in `layout` differs from the image's file manifest (as that
    /// layout writes it: shifted owners, modes without write or set-id bits).
    pub fn drift_as(
        &self,
        digest: &str,
        layout: RootLayout,
        full: bool,
    ) -> Result<crate::Drift, ImageError> {
        let root = self.root_path(digest, layout)?;
        if !root.exists() {
            return Err(ImageError::NotFound(format!("unpacked root of {digest}")));
        }
        let stamp: Stamp = fs::read(stamp_path(&root))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Stamp {
                ctime: i128::MIN,
                owners: true,
            });
        let expect = crate::files::Expect {
            layout,
            owners: stamp.owners,
            unpacked: stamp.ctime,
            full,
        };
        crate::files::drift(&root, &self.files(digest)?, &expect)
    }

    /// Moves a drifted root aside and unpacks the image again; returns the fresh root.
    pub fn reunpack(&self, digest: &str, layout: RootLayout) -> Result<PathBuf, ImageError> {
        let root = self.root_path(digest, layout)?;
        if root.exists() {
            let aside = self.scratch("drifted")?;
            fs::rename(&root, aside.join("root")).map_err(ImageError::io("move", &root))?;
        }
        self.unpack_as(digest, layout)
    }

    /// Rewrites `index.json` to list `refs` (name, manifest digest), each annotated with its name.
    pub fn write_index(&self, refs: &[(String, String)]) -> Result<(), ImageError> {
        let mut manifests = Vec::new();
        for (name, digest) in refs {
            let size = fs::metadata(self.blob_path(digest)?)
                .map(|m| m.len())
                .unwrap_or(0);
            let mut descriptor = Descriptor::new(digest.clone(), oci::MEDIA_MANIFEST, size);
            descriptor
                .annotations
                .insert(ANNOTATION_REF.to_string(), name.clone());
            manifests.push(descriptor);
        }
        let index = Index {
            manifests,
            media_type: oci::MEDIA_INDEX.into(),
            schema_version: 2,
        };
        write_atomic(&self.root.join("index.json"), &to_json(&index)?)
    }

    /// Every blob image `digest` needs: manifest, config, layers and file manifest.
    pub fn blobs_of(&self, digest: &str) -> Result<Vec<Descriptor>, ImageError> {
        let manifest = self.manifest(digest)?;
        let size = fs::metadata(self.blob_path(digest)?)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut blobs = vec![Descriptor::new(digest.into(), oci::MEDIA_MANIFEST, size)];
        blobs.push(manifest.config.clone());
        blobs.extend(manifest.layers.iter().cloned());
        if let Some(files) = manifest.annotations.get(ANNOTATION_FILES) {
            let size = fs::metadata(self.blob_path(files)?)
                .map(|m| m.len())
                .unwrap_or(0);
            blobs.push(Descriptor::new(
                files.clone(),
                crate::files::MEDIA_FILES,
                size,
            ));
        }
        Ok(blobs)
    }

    /// Removes every blob that neither `index.json` nor `keep` (manifest digests) reaches,
    /// the unpacked roots of images no longer kept, and cache records of removed layers.
    pub fn gc(&self, keep: &[String]) -> Result<GcReport, ImageError> {
        let mut kept_images: BTreeSet<String> = keep.iter().cloned().collect();
        kept_images.extend(self.refs()?.into_iter().map(|r| r.digest));
        let mut reachable = BTreeSet::new();
        for digest in &kept_images {
            for blob in self.blobs_of(digest)? {
                reachable.insert(digest_hex(&blob.digest)?.to_string());
            }
        }
        let mut report = GcReport::default();
        let dir = self.blobs_dir();
        for entry in fs::read_dir(&dir).map_err(ImageError::io("read directory", &dir))? {
            let entry = entry.map_err(ImageError::io("read directory", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || reachable.contains(&name) {
                continue;
            }
            report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path()).map_err(ImageError::io("remove", entry.path()))?;
            report.blobs += 1;
        }
        self.layer_cache()
            .retain(|record| digest_hex(&record.digest).is_ok_and(|hex| reachable.contains(hex)));
        let roots = self.roots_dir();
        for entry in fs::read_dir(&roots).map_err(ImageError::io("read directory", &roots))? {
            let entry = entry.map_err(ImageError::io("read directory", &roots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.get(..64).unwrap_or(&name);
            if !kept_images.contains(&format!("sha256:{hex}")) {
                remove_path(&entry.path());
                if !name.ends_with(".unpacked") {
                    report.roots += 1;
                }
            }
        }
        Ok(report)
    }

    /// The content of the file at `path` (no leading `/`) in the topmost of `layers` that holds
    /// it, up to 256 MiB; `None` when no layer does or it cannot be read.
    pub(crate) fn file_in_layers(&self, layers: &[Descriptor], path: &str) -> Option<Vec<u8>> {
        for layer in layers.iter().rev() {
            let file = fs::File::open(self.blob_path(&layer.digest).ok()?).ok()?;
            let reader = decompressor(&layer.media_type, io::BufReader::new(file)).ok()?;
            let mut archive = tar::Archive::new(reader);
            for entry in archive.entries().ok()? {
                let mut entry = entry.ok()?;
                let name = entry
                    .path()
                    .ok()?
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                if name == path && entry.header().entry_type().is_file() {
                    let mut bytes = Vec::new();
                    (&mut entry).take(256 << 20).read_to_end(&mut bytes).ok()?;
                    return Some(bytes);
                }
            }
        }
        None
    }

    /// Bytes of image `digest`'s blobs.
    pub fn size_of(&self, digest: &str) -> Result<u64, ImageError> {
        Ok(self.blobs_of(digest)?.iter().map(|b| b.size).sum())
    }
}

/// The reader for a layer of `media_type`: gzip (one or many members) or plain tar.
pub(crate) fn decompressor<'a, R: io::BufRead + 'a>(
    media_type: &str,
    reader: R,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    if media_type.ends_with("gzip") {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        Ok(Box::new(reader))
    } else {
        Err(ImageError::Unsupported(format!(
            "layer media type {media_type} (Phoenix reads tar and tar+gzip layers)"
        )))
    }
}

fn stamp_path(root: &Path) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(".unpacked");
    root.with_file_name(name)
}

/// The newest status change under `dir`, in nanoseconds.
fn newest_ctime(dir: &Path) -> Result<i128, ImageError> {
    let meta = fs::symlink_metadata(dir).map_err(ImageError::io("stat", dir))?;
    let mut newest = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
    if meta.is_dir() {
        for entry in fs::read_dir(dir).map_err(ImageError::io("read directory", dir))? {
            let entry = entry.map_err(ImageError::io("read directory", dir))?;
            newest = newest.max(newest_ctime(&entry.path())?);
        }
    }
    Ok(newest)
}

pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(ImageError::BadPath {
            path: digest.into(),
            why: "not a sha256 digest",
        }),
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|cause| ImageError::Json { what, cause })
}

/// Canonical JSON: struct fields in declaration (alphabetical) order, maps sorted, no spaces.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|cause| ImageError::Json {
        what: "document",
        cause,
    })
}

pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), unique()));
    fs::write(&tmp, bytes).map_err(ImageError::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(ImageError::io("write", path))
}

/// What an unpacked root records beside it (`ROOT.unpacked`).
#[derive(Debug, Serialize, serde::Deserialize)]
struct Stamp {
    /// The newest status change written while unpacking, in nanoseconds.
    ctime: i128,
    /// Whether owners were set as the image says (only root can).
    owners: bool,
}

#[cfg(test)]
mod tests;
