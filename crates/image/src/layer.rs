//! A reproducible tar layer from the recipe's `copy` steps.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{CopyStep, ImageError};

/// One entry of the layer, keyed by its path inside the image (no leading `/`).
#[derive(Debug)]
enum Entry {
    Dir,
    File { src: PathBuf, mode: u32 },
    Symlink { target: PathBuf },
}

/// The sorted set of entries a layer will hold.
#[derive(Debug, Default)]
pub(crate) struct LayerPlan {
    entries: BTreeMap<String, Entry>,
}

impl LayerPlan {
    /// Plans the layer for `steps`, resolving sources relative to `context`.
    pub(crate) fn from_copy_steps(steps: &[CopyStep], context: &Path) -> Result<Self, ImageError> {
        let mut plan = LayerPlan::default();
        for step in steps {
            let src = context.join(&step.src);
            let meta = fs::symlink_metadata(&src).map_err(|_| ImageError::MissingSource {
                path: src.clone(),
                context: context.to_path_buf(),
            })?;
            let dst = image_path(&step.dst)?;
            plan.add_parents(&dst);
            if meta.is_dir() {
                plan.add_tree(&src, &dst, step.mode)?;
            } else {
                plan.add_one(&src, dst, &meta, step.mode)?;
            }
        }
        Ok(plan)
    }

    pub(crate) fn contains(&self, path: &str) -> bool {
        matches!(
            self.entries.get(path),
            Some(Entry::File { .. } | Entry::Symlink { .. })
        )
    }

    fn add_parents(&mut self, path: &str) {
        let mut prefix = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    }

    fn add_tree(&mut self, src: &Path, dst: &str, mode: Option<u32>) -> Result<(), ImageError> {
        if !dst.is_empty() {
            self.entries.insert(dst.to_string(), Entry::Dir);
        }
        let mut children: Vec<_> = fs::read_dir(src)
            .map_err(ImageError::io("read directory", src))?
            .collect::<Result<_, _>>()
            .map_err(ImageError::io("read directory", src))?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let name = child.file_name();
            let name = name.to_str().ok_or(ImageError::BadPath {
                path: child.path().display().to_string(),
                why: "file names must be UTF-8",
            })?;
            let child_dst = if dst.is_empty() {
                name.to_string()
            } else {
                format!("{dst}/{name}")
            };
            let meta =
                fs::symlink_metadata(child.path()).map_err(ImageError::io("stat", child.path()))?;
            if meta.is_dir() {
                self.add_tree(&child.path(), &child_dst, mode)?;
            } else {
                self.add_one(&child.path(), child_dst, &meta, mode)?;
            }
        }
        Ok(())
    }

    fn add_one(
        &mut self,
        src: &Path,
        dst: String,
        meta: &fs::Metadata,
        mode: Option<u32>,
    ) -> Result<(), ImageError> {
        let entry = if meta.file_type().is_symlink() {
            let target = fs::read_link(src).map_err(ImageError::io("read link", src))?;
            Entry::Symlink { target }
        } else if meta.is_file() {
            // Only the executable bit of the source matters: the rest is normalized.
            let executable = meta.permissions().mode() & 0o111 != 0;
            let mode = mode.unwrap_or(if executable { 0o755 } else { 0o644 });
            Entry::File {
                src: src.to_path_buf(),
                mode,
            }
        } else {
            return Err(ImageError::BadPath {
                path: src.display().to_string(),
                why: "only regular files, directories and symlinks can be copied",
            });
        };
        self.entries.insert(dst, entry);
        Ok(())
    }

    /// Writes the layer as a tar stream into `out`, every header fixed but for content.
    pub(crate) fn write_tar<W: Write>(&self, out: W, mtime: u64) -> Result<W, ImageError> {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(mtime);
            let written = match entry {
                Entry::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    builder.append_data(&mut header, format!("{path}/"), io::empty())
                }
                Entry::File { src, mode } => {
                    let file = fs::File::open(src).map_err(ImageError::io("open", src))?;
                    let len = file.metadata().map_err(ImageError::io("stat", src))?.len();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(len);
                    builder.append_data(&mut header, path, file)
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)
                }
            };
            written.map_err(ImageError::io("write layer entry", path))?;
        }
        builder
            .into_inner()
            .map_err(ImageError::io("finish layer", "<layer>"))
    }
}

/// Turns `/usr/bin/app` into `usr/bin/app`, refusing `..` and empty names.
pub(crate) fn image_path(dst: &str) -> Result<String, ImageError> {
    let mut parts = Vec::new();
    for component in Path::new(dst).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_str().ok_or(ImageError::BadPath {
                path: dst.to_string(),
                why: "paths must be UTF-8",
            })?),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::BadPath {
                    path: dst.to_string(),
                    why: "`..` is not allowed",
                });
            }
        }
    }
    Ok(parts.join("/"))
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Returns the inner writer, the `sha256:` digest and the byte count.
    pub(crate) fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", crate::hex(&self.hasher.finalize())),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_are_normalized_and_dotdot_refused() {
        assert_eq!(image_path("/bin/hello").unwrap(), "bin/hello");
        assert_eq!(image_path("./a/./b").unwrap(), "a/b");
        assert!(matches!(
            image_path("/a/../../etc"),
            Err(ImageError::BadPath { .. })
        ));
    }
}
