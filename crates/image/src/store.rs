//! The image store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) plus
//! unpacked, read-only roots that instances run from.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::layer::{HashingWriter, LayerPlan, image_path};
use crate::oci::{self, ConfigDocument, Descriptor, ImageConfig, Index, Manifest, RootFs};
use crate::{ImageError, Recipe};

/// Inputs of a bake that do not come from the recipe.
#[derive(Debug, Clone, Copy, Default)]
pub struct BakeOptions {
    /// The mtime of every file and the image's `created` time (`SOURCE_DATE_EPOCH`; default 0).
    pub mtime: u64,
}

/// The result of a bake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakedImage {
    /// `sha256:…` of the manifest: the image's identity.
    pub digest: String,
    pub config: ImageConfig,
    /// Bytes of manifest, config and layers together.
    pub size: u64,
}

/// A content-addressed OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        // Absolute, because instances resolve their entrypoint after changing directory.
        let root = root.into();
        let root = std::path::absolute(&root).map_err(ImageError::io("resolve", &root))?;
        let store = ImageStore { root };
        for dir in [store.blobs_dir(), store.roots_dir()] {
            fs::create_dir_all(&dir).map_err(ImageError::io("create", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.root.join("index.json").exists() {
            store.write_index(&[])?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn roots_dir(&self) -> PathBuf {
        self.root.join("roots")
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

    /// Bakes `recipe`, reading `copy` sources relative to `context`. Writing is idempotent:
    /// blobs that already exist are left as they are.
    pub fn bake(
        &self,
        recipe: &Recipe,
        context: &Path,
        options: BakeOptions,
    ) -> Result<BakedImage, ImageError> {
        let entry = recipe.entrypoint.first().ok_or(ImageError::NoEntrypoint)?;
        if !entry.starts_with('/') {
            return Err(ImageError::BadPath {
                path: entry.clone(),
                why: "the entrypoint must be an absolute path inside the image",
            });
        }
        let plan = LayerPlan::from_copy_steps(&recipe.copy, context)?;
        if !plan.contains(&image_path(entry)?) {
            return Err(ImageError::BadPath {
                path: entry.clone(),
                why: "the entrypoint is not in the image: add a `copy` step that puts it there",
            });
        }
        let layer = self.write_layer(&plan, options.mtime)?;
        let config = ImageConfig {
            cmd: recipe.cmd.clone(),
            entrypoint: recipe.entrypoint.clone(),
            env: recipe.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            working_dir: recipe.workdir.clone().unwrap_or_else(|| "/".into()),
        };
        let document = ConfigDocument {
            architecture: oci::oci_architecture().into(),
            config: config.clone(),
            created: oci::rfc3339(options.mtime),
            os: "linux".into(),
            rootfs: RootFs {
                diff_ids: vec![layer.diff_id.clone()],
                kind: "layers".into(),
            },
        };
        let config_bytes = to_json(&document)?;
        let config_desc = self.write_blob(&config_bytes, oci::MEDIA_CONFIG)?;
        let manifest = Manifest {
            config: config_desc,
            layers: vec![layer.descriptor],
            media_type: oci::MEDIA_MANIFEST.into(),
            schema_version: 2,
        };
        let manifest_bytes = to_json(&manifest)?;
        let manifest_desc = self.write_blob(&manifest_bytes, oci::MEDIA_MANIFEST)?;
        let size = manifest_desc.size
            + manifest.config.size
            + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        Ok(BakedImage {
            digest: manifest_desc.digest,
            config,
            size,
        })
    }

    fn write_layer(&self, plan: &LayerPlan, mtime: u64) -> Result<LayerBlob, ImageError> {
        let tmp = self
            .blobs_dir()
            .join(format!(".tmp-layer-{}-{}", std::process::id(), unique()));
        let file = fs::File::create(&tmp).map_err(ImageError::io("create", &tmp))?;
        let compressed = HashingWriter::new(BufWriter::new(file));
        let gzip = flate2::GzBuilder::new().write(compressed, Compression::new(6));
        let plain = plan.write_tar(HashingWriter::new(gzip), mtime)?;
        let (gzip, diff_id, _) = plain.finish();
        let compressed = gzip.finish().map_err(ImageError::io("compress", &tmp))?;
        let (mut file, digest, size) = compressed.finish();
        file.flush().map_err(ImageError::io("write", &tmp))?;
        drop(file);
        let path = self.blob_path(&digest)?;
        fs::rename(&tmp, &path).map_err(ImageError::io("store", &path))?;
        let descriptor = Descriptor {
            digest,
            media_type: oci::MEDIA_LAYER.into(),
            size,
            annotations: Default::default(),
        };
        Ok(LayerBlob {
            descriptor,
            diff_id,
        })
    }

    fn write_blob(&self, bytes: &[u8], media_type: &str) -> Result<Descriptor, ImageError> {
        let digest = crate::sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(Descriptor {
            digest,
            media_type: media_type.into(),
            size: bytes.len() as u64,
            annotations: Default::default(),
        })
    }

    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound(digest.to_string()),
            _ => ImageError::Io {
                action: "read",
                path: path.clone(),
                cause: e,
            },
        })?;
        let actual = crate::sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::Corrupt {
                digest: digest.into(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The manifest of image `digest`.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, ImageError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|cause| ImageError::Json {
            what: "manifest",
            cause,
        })
    }

    /// The run configuration of image `digest`.
    pub fn config(&self, digest: &str) -> Result<ImageConfig, ImageError> {
        let manifest = self.manifest(digest)?;
        let bytes = self.read_blob(&manifest.config.digest)?;
        let document: ConfigDocument =
            serde_json::from_slice(&bytes).map_err(|cause| ImageError::Json {
                what: "config",
                cause,
            })?;
        Ok(document.config)
    }

    /// The unpacked root of image `digest`, unpacking it first if needed. Files and
    /// directories are made read-only: an instance must never change its image.
    pub fn unpack(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let target = self.roots_dir().join(digest_hex(digest)?);
        if target.exists() {
            return Ok(target);
        }
        let manifest = self.manifest(digest)?;
        let tmp = self
            .roots_dir()
            .join(format!(".tmp-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&tmp).map_err(ImageError::io("create", &tmp))?;
        let unpacked = manifest
            .layers
            .iter()
            .try_for_each(|layer| self.unpack_layer(&layer.digest, &tmp));
        let result = unpacked.and_then(|()| make_read_only(&tmp)).and_then(|()| {
            fs::rename(&tmp, &target)
                .or_else(|e| if target.exists() { Ok(()) } else { Err(e) })
                .map_err(ImageError::io("store", &target))
        });
        if tmp.exists() {
            remove_tree(&tmp);
        }
        result.map(|()| target)
    }

    fn unpack_layer(&self, digest: &str, into: &Path) -> Result<(), ImageError> {
        let path = self.blob_path(digest)?;
        let file = fs::File::open(&path).map_err(|_| ImageError::NotFound(digest.to_string()))?;
        let mut reader = HashingReader {
            inner: io::BufReader::new(file),
            hasher: Sha256::new(),
        };
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&mut reader));
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        archive
            .unpack(into)
            .map_err(ImageError::io("unpack layer into", into))?;
        io::copy(&mut reader, &mut io::sink()).map_err(ImageError::io("read", &path))?;
        let actual = format!("sha256:{}", crate::hex(&reader.hasher.finalize()));
        if actual != digest {
            return Err(ImageError::Corrupt {
                digest: digest.into(),
                actual,
            });
        }
        Ok(())
    }

    /// Rewrites `index.json` to list `refs` (name, manifest digest), each annotated with its name.
    pub fn write_index(&self, refs: &[(String, String)]) -> Result<(), ImageError> {
        let mut manifests = Vec::new();
        for (name, digest) in refs {
            let size = fs::metadata(self.blob_path(digest)?)
                .map(|m| m.len())
                .unwrap_or(0);
            let annotations = [(
                "org.opencontainers.image.ref.name".to_string(),
                name.clone(),
            )]
            .into();
            manifests.push(Descriptor {
                digest: digest.clone(),
                media_type: oci::MEDIA_MANIFEST.into(),
                size,
                annotations,
            });
        }
        let index = Index {
            manifests,
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            schema_version: 2,
        };
        write_atomic(&self.root.join("index.json"), &to_json(&index)?)
    }
}

struct LayerBlob {
    descriptor: Descriptor,
    diff_id: String,
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(ImageError::BadPath {
            path: digest.into(),
            why: "not a sha256 digest",
        }),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|cause| ImageError::Json {
        what: "document",
        cause,
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), unique()));
    fs::write(&tmp, bytes).map_err(ImageError::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(ImageError::io("write", path))
}

fn make_read_only(dir: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).map_err(ImageError::io("read directory", dir))? {
        let entry = entry.map_err(ImageError::io("read directory", dir))?;
        let meta =
            fs::symlink_metadata(entry.path()).map_err(ImageError::io("stat", entry.path()))?;
        if meta.is_dir() {
            make_read_only(&entry.path())?;
        }
        if !meta.file_type().is_symlink() {
            let mode = meta.permissions().mode() & !0o222;
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))
                .map_err(ImageError::io("chmod", entry.path()))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555))
        .map_err(ImageError::io("chmod", dir))
}

/// Removes a read-only tree, restoring write permission on its directories first.
fn remove_tree(dir: &Path) {
    fn writable(dir: &Path) {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    writable(&entry.path());
                }
            }
        }
    }
    writable(dir);
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests;
