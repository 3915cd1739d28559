//! OCI archives in and out: `export` writes an image as an OCI image layout in a tar file
//! (with Docker's `manifest.json` beside `index.json`, so both `podman load` and `docker load`
//! take it); `import` reads an OCI layout directory or archive written by any tool.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files::{FileEntry, FileKind};
use crate::hashing::HashingReader;
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::store::{ANNOTATION_REF, ImageRef, digest_hex, parse, to_json};
use crate::unpack::remove_path;
use crate::{ImageError, ImageStore};

/// One entry of Docker's `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
}

impl ImageStore {
    /// Writes image `digest` to `out` as an OCI archive whose index names it `reference`
    /// (e.g. `hello:latest`). The same image always gives the same bytes.
    pub fn export(&self, digest: &str, reference: &str, out: impl Write) -> Result<(), ImageError> {
        let manifest = self.manifest(digest)?;
        let blobs = self.blobs_of(digest)?;
        let mtime = self
            .config_document(digest)
            .ok()
            .and_then(|c| oci::parse_rfc3339(&c.created))
            .unwrap_or(0);
        let mut entry = Descriptor::new(digest.into(), oci::MEDIA_MANIFEST, blobs[0].size);
        entry
            .annotations
            .insert(ANNOTATION_REF.into(), reference.into());
        let index = Index {
            manifests: vec![entry],
            media_type: oci::MEDIA_INDEX.into(),
            schema_version: 2,
        };
        let blob_name = |d: &str| -> Result<String, ImageError> {
            Ok(format!("blobs/sha256/{}", digest_hex(d)?))
        };
        let docker = vec![DockerEntry {
            config: blob_name(&manifest.config.digest)?,
            layers: manifest
                .layers
                .iter()
                .map(|l| blob_name(&l.digest))
                .collect::<Result<_, _>>()?,
            repo_tags: vec![docker_tag(reference)],
        }];
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        let small = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| {
            let mut header = header(mtime, bytes.len() as u64);
            tar.append_data(&mut header, name, bytes)
                .map_err(ImageError::io("write archive entry", name))
        };
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut header = header(mtime, 0);
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            tar.append_data(&mut header, dir, io::empty())
                .map_err(ImageError::io("write archive entry", dir))?;
        }
        let mut sorted = blobs.clone();
        sorted.sort_by(|a, b| a.digest.cmp(&b.digest));
        sorted.dedup_by(|a, b| a.digest == b.digest);
        for blob in &sorted {
            let path = self.blob_path(&blob.digest)?;
            let file = fs::File::open(&path).map_err(ImageError::io("open", &path))?;
            let len = file
                .metadata()
                .map_err(ImageError::io("stat", &path))?
                .len();
            let mut header = header(mtime, len);
            tar.append_data(&mut header, blob_name(&blob.digest)?, file)
                .map_err(ImageError::io("write archive entry", &path))?;
        }
        small(&mut tar, "index.json", &to_json(&index)?)?;
        small(&mut tar, "manifest.json", &to_json(&docker)?)?;
        small(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        tar.into_inner()
            .and_then(|mut out| out.flush())
            .map_err(ImageError::io("finish", "archive"))
    }

    /// Imports the images of the OCI layout directory or archive at `path` (only `reference`
    /// when given: a ref name in its index). Blobs are verified as they are copied.
    pub fn import(
        &self,
        path: &Path,
        reference: Option<&str>,
    ) -> Result<Vec<ImageRef>, ImageError> {
        let (layout, scratch) = if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let scratch = self.scratch("import")?;
            let unpacked = extract_layout(path, &scratch);
            if let Err(e) = unpacked {
                remove_path(&scratch);
                return Err(e);
            }
            (scratch.clone(), Some(scratch))
        };
        let result = self.import_layout(&layout, path, reference);
        if let Some(scratch) = scratch {
            remove_path(&scratch);
        }
        result
    }

    fn import_layout(
        &self,
        layout: &Path,
        shown: &Path,
        reference: Option<&str>,
    ) -> Result<Vec<ImageRef>, ImageError> {
        let index_path = layout.join("index.json");
        let bytes = fs::read(&index_path).map_err(|_| ImageError::NotOci {
            path: shown.to_path_buf(),
            why: "it has no index.json (a docker-archive? convert it with `skopeo copy \
                  docker-archive:FILE oci-archive:FILE.oci`)"
                .into(),
        })?;
        let index: Index = parse("index.json", &bytes)?;
        let names = |d: &Descriptor| {
            d.annotations
                .get(ANNOTATION_REF)
                .cloned()
                .unwrap_or_default()
        };
        let chosen: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| {
                reference.is_none_or(|r| names(d) == r || names(d).ends_with(&format!(":{r}")))
            })
            .collect();
        if chosen.is_empty() {
            let known: Vec<String> = index.manifests.iter().map(names).collect();
            return Err(ImageError::NotOci {
                path: shown.to_path_buf(),
                why: format!(
                    "no image named {:?} in it (it holds: {})",
                    reference.unwrap_or(""),
                    known.join(", ")
                ),
            });
        }
        let mut imported = Vec::new();
        for descriptor in chosen {
            let manifest = self.import_manifest(layout, descriptor)?;
            imported.push(ImageRef {
                name: names(descriptor),
                digest: manifest,
            });
        }
        Ok(imported)
    }

    /// Copies one manifest (following a multi-platform index to this machine's platform) and
    /// its blobs; returns the manifest digest.
    fn import_manifest(
        &self,
        layout: &Path,
        descriptor: &Descriptor,
    ) -> Result<String, ImageError> {
        let bytes = read_layout_blob(layout, &descriptor.digest)?;
        if [oci::MEDIA_INDEX, oci::MEDIA_DOCKER_LIST].contains(&descriptor.media_type.as_str()) {
            let nested: Index = parse("index", &bytes)?;
            let arch = oci::oci_architecture();
            let mine = nested
                .manifests
                .iter()
                .find(|d| {
                    d.platform
                        .as_ref()
                        .is_none_or(|p| p.architecture == arch && p.os == "linux")
                })
                .ok_or_else(|| {
                    ImageError::Unsupported(format!("no linux/{arch} image in the index"))
                })?;
            return self.import_manifest(layout, mine);
        }
        let manifest: Manifest = parse("manifest", &bytes)?;
        for layer in &manifest.layers {
            // Refuse a layer Phoenix cannot unpack now, not when an instance starts: an
            // unknown format, an entry that would land outside the root, a size past the limit.
            let path = layout.join("blobs/sha256").join(digest_hex(&layer.digest)?);
            let file =
                fs::File::open(&path).map_err(|_| ImageError::NotFound(layer.digest.clone()))?;
            let reader = crate::store::decompressor(&layer.media_type, io::BufReader::new(file))?;
            crate::unpack::check_layer(reader, &layer.digest, &self.limits())?;
        }
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            self.copy_blob(layout, &blob.digest)?;
        }
        // The file manifest of a Phoenix image travels with it; other images get theirs
        // computed on first use.
        if let Some(files) = manifest.annotations.get(crate::store::ANNOTATION_FILES)
            && layout
                .join("blobs/sha256")
                .join(digest_hex(files)?)
                .exists()
        {
            self.copy_blob(layout, files)?;
        }
        self.write_blob(&bytes, &descriptor.media_type)?;
        Ok(descriptor.digest.clone())
    }

    fn copy_blob(&self, layout: &Path, digest: &str) -> Result<(), ImageError> {
        let target = self.blob_path(digest)?;
        if target.exists() {
            return Ok(());
        }
        let source = layout.join("blobs/sha256").join(digest_hex(digest)?);
        let input = fs::File::open(&source).map_err(|_| ImageError::NotFound(digest.into()))?;
        let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
        let mut output = fs::File::create(&tmp).map_err(ImageError::io("create", &tmp))?;
        let mut reader = HashingReader::new(input);
        io::copy(&mut reader, &mut output).map_err(ImageError::io("copy into", &tmp))?;
        let actual = reader.digest();
        if let Err(corrupt) = crate::expect_digest(digest, actual) {
            let _ = fs::remove_file(&tmp);
            return Err(corrupt);
        }
        fs::rename(&tmp, &target).map_err(ImageError::io("store", &target))
    }
}

fn header(mtime: u64, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

/// `name:tag` for Docker's `RepoTags`: a bare name gets `:latest`.
fn docker_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    }
}

fn read_layout_blob(layout: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
    let path = layout.join("blobs/sha256").join(digest_hex(digest)?);
    let bytes = fs::read(&path).map_err(|_| ImageError::NotFound(digest.into()))?;
    crate::expect_digest(digest, crate::sha256_digest(&bytes))?;
    Ok(bytes)
}

/// Unpacks the layout files of an OCI archive (and nothing else) into `into`.
fn extract_layout(archive: &Path, into: &Path) -> Result<(), ImageError> {
    let file = fs::File::open(archive).map_err(|_| ImageError::MissingSource {
        path: archive.to_path_buf(),
        context: archive.parent().unwrap_or(Path::new(".")).to_path_buf(),
    })?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let entries = tar
        .entries()
        .map_err(ImageError::io("read archive", archive))?;
    for entry in entries {
        let mut entry = entry.map_err(ImageError::io("read archive", archive))?;
        let name: PathBuf = entry
            .path()
            .map_err(ImageError::io("read archive", archive))?
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        let text = name.to_string_lossy();
        let wanted = text == "index.json"
            || text == "oci-layout"
            || (text.starts_with("blobs/sha256/") && name.components().count() == 3);
        if wanted && entry.header().entry_type().is_file() {
            let target = into.join(&name);
            fs::create_dir_all(target.parent().expect("has parent"))
                .map_err(ImageError::io("create", into))?;
            let mut out = fs::File::create(&target).map_err(ImageError::io("create", &target))?;
            io::copy(&mut entry, &mut out).map_err(ImageError::io("read archive", archive))?;
        }
    }
    Ok(())
}

/// The entries of a layer tar, regular files hashed. Hard links take their target's content;
/// devices, FIFOs and sockets are left out.
pub(crate) fn tar_entries(reader: impl Read, what: &Path) -> Result<Vec<FileEntry>, ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut files: Vec<FileEntry> = Vec::new();
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for entry in archive
        .entries()
        .map_err(ImageError::io("read layer", what))?
    {
        let mut entry = entry.map_err(ImageError::io("read layer", what))?;
        let raw = entry.path().map_err(ImageError::io("read layer", what))?;
        let path = normalize(&raw.to_string_lossy());
        let header = entry.header();
        let (mode, uid, gid) = (
            header.mode().unwrap_or(0) & 0o7777,
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let (dir, name) = match path.rsplit_once('/') {
            Some((dir, name)) => (dir.to_string(), name.to_string()),
            None => (String::new(), path.clone()),
        };
        let base = FileEntry {
            path: path.clone(),
            kind: FileKind::Dir,
            mode,
            uid,
            gid,
            size: 0,
            sha256: None,
            link: None,
        };
        let file = if name == ".wh..wh..opq" {
            FileEntry {
                path: dir,
                kind: FileKind::Opaque,
                ..base
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            let path = if dir.is_empty() {
                hidden.to_string()
            } else {
                format!("{dir}/{hidden}")
            };
            FileEntry {
                path,
                kind: FileKind::Whiteout,
                ..base
            }
        } else {
            match header.entry_type() {
                tar::EntryType::Directory => base,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut hasher = Sha256::new();
                    let size = io::copy(&mut entry, &mut hasher)
                        .map_err(ImageError::io("read layer", what))?;
                    FileEntry {
                        kind: FileKind::File,
                        size,
                        sha256: Some(format!("sha256:{}", crate::hex(&hasher.finalize()))),
                        ..base
                    }
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.to_string_lossy().into_owned());
                    FileEntry {
                        kind: FileKind::Symlink,
                        mode: 0o777,
                        link: target,
                        ..base
                    }
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| normalize(&t.to_string_lossy()));
                    match target
                        .and_then(|t| by_path.get(&t))
                        .map(|&i| files[i].clone())
                    {
                        Some(original) => FileEntry {
                            path,
                            mode,
                            uid,
                            gid,
                            ..original
                        },
                        None => continue,
                    }
                }
                _ => continue,
            }
        };
        if file.path.is_empty() && file.kind == FileKind::Dir {
            continue;
        }
        by_path.insert(file.path.clone(), files.len());
        files.push(file);
    }
    Ok(files)
}

/// `./usr/bin/` → `usr/bin`.
fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_tags_default_to_latest() {
        assert_eq!(docker_tag("hello"), "hello:latest");
        assert_eq!(docker_tag("hello:v2"), "hello:v2");
        assert_eq!(
            docker_tag("localhost:5000/hello"),
            "localhost:5000/hello:latest"
        );
    }
}
