//! The file manifest every image carries: each file's path, type, mode, owner, size, sha256
//! and link target, sorted by path, with a Merkle root; and the drift check against it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

pub const MEDIA_FILES: &str = "application/vnd.phoenix.files.v1+json";

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    /// A layer's deletion of the path below it (OCI `.wh.NAME`).
    Whiteout,
    /// A layer's replacement of a directory's whole content (OCI `.wh..wh..opq`).
    Opaque,
}

/// One path of an image (no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The merged view of an image's layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// The Merkle root over the sorted entries (RFC 6962 tree hashing).
    pub root: String,
    pub files: Vec<FileEntry>,
}

impl FileManifest {
    /// Applies layers in order (whiteouts delete, opaque markers empty a directory) and hashes
    /// the result.
    pub fn merge<'a>(layers: impl IntoIterator<Item = &'a [FileEntry]>) -> FileManifest {
        let mut merged = FileManifest::merge_without_root(layers);
        merged.root = merkle_root(&merged.files);
        merged
    }

    /// `merge`, leaving `root` empty (for intermediate states of a bake).
    pub(crate) fn merge_without_root<'a>(
        layers: impl IntoIterator<Item = &'a [FileEntry]>,
    ) -> FileManifest {
        let mut tree: BTreeMap<String, FileEntry> = BTreeMap::new();
        for layer in layers {
            for entry in layer {
                match entry.kind {
                    FileKind::Whiteout => remove_subtree(&mut tree, &entry.path, true),
                    FileKind::Opaque => remove_subtree(&mut tree, &entry.path, false),
                    _ => {
                        if entry.kind != FileKind::Dir {
                            remove_subtree(&mut tree, &entry.path, false);
                        }
                        tree.insert(entry.path.clone(), entry.clone());
                    }
                }
            }
        }
        FileManifest {
            root: String::new(),
            files: tree.into_values().collect(),
        }
    }

    pub fn get(&self, path: &str) -> Option<&FileEntry> {
        self.files
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }

    /// Total bytes of regular files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Removes `path`'s descendants, and `path` itself when `itself`.
fn remove_subtree(tree: &mut BTreeMap<String, FileEntry>, path: &str, itself: bool) {
    if itself {
        tree.remove(path);
    }
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    let doomed: Vec<String> = tree
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for key in doomed {
        tree.remove(&key);
    }
}

/// RFC 6962 Merkle tree hash: leaves `H(0 || entry)`, nodes `H(1 || left || right)`, split at
/// the largest power of two below the count. Any change to any entry changes the root.
pub fn merkle_root(files: &[FileEntry]) -> String {
    fn leaf(entry: &FileEntry) -> [u8; 32] {
        let line = serde_json::to_vec(entry).expect("entries serialize");
        Sha256::new()
            .chain_update([0u8])
            .chain_update(line)
            .finalize()
            .into()
    }
    fn node(files: &[FileEntry]) -> [u8; 32] {
        match files.len() {
            0 => Sha256::digest([]).into(),
            1 => leaf(&files[0]),
            n => {
                // The largest power of two strictly below n.
                let mut split = 1;
                while split * 2 < n {
                    split *= 2;
                }
                Sha256::new()
                    .chain_update([1u8])
                    .chain_update(node(&files[..split]))
                    .chain_update(node(&files[split..]))
                    .finalize()
                    .into()
            }
        }
    }
    format!("sha256:{}", crate::hex(&node(files)))
}

/// How a root differs from its image's manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub added: Vec<String>,
    pub changed: Vec<Change>,
    pub removed: Vec<String>,
    /// Files whose content was hashed because their metadata did not prove them unchanged.
    pub hashed: usize,
    /// Paths compared.
    pub checked: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub path: String,
    /// What differs: `type`, `mode`, `owner`, `size`, `content`, `link`.
    pub what: Vec<&'static str>,
}

impl Drift {
    pub fn is_clean(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// What an unpacked root should look like, besides the manifest's entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect {
    /// How the root was written: owners shifted, write and set-id bits dropped.
    pub layout: crate::RootLayout,
    /// Whether owners were set as the image says (only root can); if not, they are not compared.
    pub owners: bool,
    /// When unpacking finished (the newest ctime then, in nanoseconds).
    pub unpacked: i128,
    /// Hash every file, whatever its metadata says.
    pub full: bool,
}

/// Compares the tree at `root` with `manifest`. Metadata first: a regular file of the right
/// size whose status has not changed since unpacking finished (a write, chmod or chown always
/// moves ctime forward) is taken as unchanged; only the others are hashed. Modes and owners
/// are compared as the root's layout writes them.
pub(crate) fn drift(
    root: &Path,
    manifest: &FileManifest,
    expect: &Expect,
) -> Result<Drift, ImageError> {
    let mut found = BTreeMap::new();
    walk(root, root, &mut found)?;
    let mut drift = Drift::default();
    let offset = expect.layout.id_offset;
    for entry in &manifest.files {
        let Some(meta) = found.remove(&entry.path) else {
            drift.removed.push(entry.path.clone());
            continue;
        };
        drift.checked += 1;
        let mut what = Vec::new();
        let kind = kind_of(&meta);
        if kind != Some(entry.kind) {
            what.push("type");
        } else {
            // Where the layout drops write bits, unlocking a directory to patch it shows up
            // as the content change it allows, not as a mode change.
            let mask = if expect.layout.keep_write_bits {
                0o7777
            } else {
                0o7555
            };
            if kind != Some(FileKind::Symlink)
                && (meta.mode() & mask) != (expect.layout.mode(entry.mode) & mask)
            {
                what.push("mode");
            }
            let owner = (
                entry.uid.saturating_add(offset),
                entry.gid.saturating_add(offset),
            );
            if expect.owners && (meta.uid(), meta.gid()) != owner {
                what.push("owner");
            }
            match entry.kind {
                FileKind::File if meta.size() != entry.size => what.push("size"),
                FileKind::File if expect.full || ctime_ns(&meta) > expect.unpacked => {
                    drift.hashed += 1;
                    let path = root.join(&entry.path);
                    if Some(sha256_file(&path)?) != entry.sha256 {
                        what.push("content");
                    }
                }
                FileKind::Symlink => {
                    let path = root.join(&entry.path);
                    let target =
                        fs::read_link(&path).map_err(ImageError::io("read link", &path))?;
                    if Some(target.to_string_lossy().as_ref()) != entry.link.as_deref() {
                        what.push("link");
                    }
                }
                _ => {}
            }
        }
        if !what.is_empty() {
            drift.changed.push(Change {
                path: entry.path.clone(),
                what,
            });
        }
    }
    drift.added = found.into_keys().collect();
    Ok(drift)
}

fn ctime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

fn kind_of(meta: &fs::Metadata) -> Option<FileKind> {
    let t = meta.file_type();
    if t.is_dir() {
        Some(FileKind::Dir)
    } else if t.is_file() {
        Some(FileKind::File)
    } else if t.is_symlink() {
        Some(FileKind::Symlink)
    } else {
        // Devices, FIFOs and sockets are never part of an image.
        None
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut BTreeMap<String, fs::Metadata>,
) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).map_err(ImageError::io("read directory", dir))? {
        let entry = entry.map_err(ImageError::io("read directory", dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(ImageError::io("stat", &path))?;
        let relative = path
            .strip_prefix(root)
            .expect("walked under root")
            .to_string_lossy()
            .into_owned();
        if meta.is_dir() {
            walk(root, &path, found)?;
        }
        found.insert(relative, meta);
    }
    Ok(())
}

/// `sha256:` of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = fs::File::open(path).map_err(ImageError::io("open", path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(ImageError::io("read", path))?;
    Ok(format!("sha256:{}", crate::hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, sha: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            sha256: Some(sha.into()),
            link: None,
        }
    }

    fn dir(path: &str) -> FileEntry {
        FileEntry {
            kind: FileKind::Dir,
            size: 0,
            sha256: None,
            ..file(path, "")
        }
    }

    fn marker(path: &str, kind: FileKind) -> FileEntry {
        FileEntry { kind, ..dir(path) }
    }

    #[test]
    fn layers_merge_with_whiteouts_and_opaque_directories() {
        let lower = vec![
            dir("etc"),
            file("etc/a", "1"),
            file("etc/b", "2"),
            dir("var"),
            file("var/x", "3"),
        ];
        let upper = vec![
            marker("etc/a", FileKind::Whiteout),
            file("etc/c", "4"),
            marker("var", FileKind::Opaque),
            file("var/y", "5"),
        ];
        let merged = FileManifest::merge([lower.as_slice(), upper.as_slice()]);
        let paths: Vec<&str> = merged.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["etc", "etc/b", "etc/c", "var", "var/y"]);
        assert!(merged.get("etc/c").is_some() && merged.get("etc/a").is_none());
    }

    #[test]
    fn the_merkle_root_changes_with_any_entry() {
        let files: Vec<FileEntry> = (0..7).map(|i| file(&format!("f{i}"), "x")).collect();
        let root = merkle_root(&files);
        assert_eq!(root, merkle_root(&files.clone()));
        for i in 0..files.len() {
            let mut changed = files.clone();
            changed[i].mode = 0o600;
            assert_ne!(merkle_root(&changed), root, "entry {i}");
        }
        assert_ne!(merkle_root(&files[..6]), root);
    }
}
