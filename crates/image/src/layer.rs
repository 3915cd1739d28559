//! One layer: planned from a `copy` step, a root directory or a `run` step's overlay upper
//! directory; written as a reproducible tar+gzip blob; applied to a directory when unpacking.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::StatCache;
use crate::files::{FileEntry, FileKind, FileManifest};
use crate::hashing::HashingReader;
use crate::{CopyStep, ImageError};

/// A layer in the store: its blob, its uncompressed digest and the entries it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub files: Vec<FileEntry>,
}

/// The entries a layer will hold, keyed by path inside the image (no leading `/`), each with
/// the file on this machine that supplies its content.
#[derive(Debug, Default)]
pub(crate) struct LayerPlan {
    entries: BTreeMap<String, (FileEntry, Option<PathBuf>)>,
}

impl LayerPlan {
    /// The owners as a user namespace mapping ids from `offset` saw them (what a `run` step in
    /// one made is owned by `offset` + its id inside). Owners below the offset (the overlay's
    /// own whiteouts) stay as they are.
    pub(crate) fn unshifted(mut self, offset: u32) -> LayerPlan {
        if offset > 0 {
            for (entry, _) in self.entries.values_mut() {
                entry.uid = entry.uid.checked_sub(offset).unwrap_or(entry.uid);
                entry.gid = entry.gid.checked_sub(offset).unwrap_or(entry.gid);
            }
        }
        self
    }

    /// The entries, content hashes included: what the layer's cache key is made of.
    pub(crate) fn files(&self) -> Vec<FileEntry> {
        let mut files: Vec<FileEntry> = self.entries.values().map(|(e, _)| e.clone()).collect();
        // Deletions first, so that a reader applying the tar in order never deletes what the
        // same layer adds.
        files.sort_by_key(|f| (!is_marker(f), f.path.clone()));
        files
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.entries.values().map(|(e, _)| e.size).sum()
    }

    /// Plans a copy of `step.src` (relative to `context`, and never outside it) to `step.dst`.
    /// Missing parent directories take their metadata from `below`, else 0755 root.
    pub(crate) fn copy(
        step: &CopyStep,
        context: &Path,
        below: &FileManifest,
        hashes: &mut StatCache,
    ) -> Result<Self, ImageError> {
        let context = fs::canonicalize(context).map_err(ImageError::io("resolve", context))?;
        let src = inside_context(&context, &step.src)?;
        let meta = fs::symlink_metadata(&src).map_err(ImageError::io("stat", &src))?;
        let dst = image_path(&step.dst)?;
        let (uid, gid) = match &step.owner {
            None => (0, 0),
            Some(owner) => crate::recipe::numeric_owner(owner).ok_or(ImageError::BadPath {
                path: owner.clone(),
                why: "`owner` must be numeric, `UID:GID` or `UID` (names need the image's /etc/passwd)",
            })?,
        };
        let mut plan = LayerPlan::default();
        plan.add_parents(&dst, below);
        let mut copier = Copier {
            context: &context,
            uid,
            gid,
            mode: step.mode,
            hashes,
            plan: &mut plan,
        };
        if meta.is_dir() {
            copier.tree(&src, &dst)?;
        } else {
            copier.one(&src, dst, &meta)?;
        }
        if step.libraries {
            plan.add_libraries(below, hashes)?;
        }
        Ok(plan)
    }

    /// Adds what the plan's programs need to start, from this host (outside the build context,
    /// on purpose): each ELF interpreter at the path the binary names, each shared library at
    /// its real path. What the image below already has is left out.
    fn add_libraries(
        &mut self,
        below: &FileManifest,
        hashes: &mut StatCache,
    ) -> Result<(), ImageError> {
        let programs: Vec<PathBuf> = self
            .entries
            .values()
            .filter(|(entry, _)| entry.kind == FileKind::File && entry.mode & 0o111 != 0)
            .filter_map(|(_, source)| source.clone())
            .collect();
        for program in programs {
            for (at, real) in crate::elf::host_closure(&program)? {
                let path = image_path(&at)?;
                if self.entries.contains_key(&path) || crate::elf::exists(below, &at) {
                    continue;
                }
                let meta = fs::metadata(&real).map_err(ImageError::io("stat", &real))?;
                let sha256 = hashes.sha256(&real, &meta)?;
                self.add_parents(&path, below);
                let entry = FileEntry {
                    path: path.clone(),
                    kind: FileKind::File,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    size: meta.size(),
                    sha256: Some(sha256),
                    link: None,
                };
                self.entries.insert(path, (entry, Some(real)));
            }
        }
        Ok(())
    }

    /// Plans a layer holding the tree at `root` as it is: modes, numeric owners and symlinks
    /// kept. Device nodes under `dev/` are left out (runtimes provide `/dev`); other special
    /// files are an error. With `overlay_upper`, overlayfs whiteouts (0/0 character devices)
    /// and opaque directories become OCI whiteouts.
    pub(crate) fn tree(
        root: &Path,
        hashes: &mut StatCache,
        overlay_upper: bool,
    ) -> Result<Self, ImageError> {
        let mut plan = LayerPlan::default();
        plan.walk(root, root, hashes, overlay_upper)?;
        Ok(plan)
    }

    fn walk(
        &mut self,
        root: &Path,
        dir: &Path,
        hashes: &mut StatCache,
        overlay_upper: bool,
    ) -> Result<(), ImageError> {
        for child in sorted_children(dir)? {
            let path = child.path();
            let meta = fs::symlink_metadata(&path).map_err(ImageError::io("stat", &path))?;
            let name = utf8_relative(root, &path)?;
            let entry = |kind: FileKind| FileEntry {
                path: name.clone(),
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: 0,
                sha256: None,
                link: None,
            };
            let file_type = meta.file_type();
            if file_type.is_dir() {
                self.entries
                    .insert(name.clone(), (entry(FileKind::Dir), None));
                if overlay_upper && is_opaque(&path) {
                    let marker = FileEntry {
                        path: name.clone(),
                        ..entry(FileKind::Opaque)
                    };
                    self.entries
                        .insert(format!("{name}/.wh..wh..opq"), (marker, None));
                }
                self.walk(root, &path, hashes, overlay_upper)?;
            } else if file_type.is_file() {
                let sha256 = hashes.sha256(&path, &meta)?;
                let file = FileEntry {
                    size: meta.size(),
                    sha256: Some(sha256),
                    ..entry(FileKind::File)
                };
                self.entries.insert(name, (file, Some(path)));
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(ImageError::io("read link", &path))?;
                let link = FileEntry {
                    link: Some(utf8(&target, &path)?.to_string()),
                    ..entry(FileKind::Symlink)
                };
                self.entries.insert(name, (link, None));
            } else if overlay_upper && file_type.is_char_device() && meta.rdev() == 0 {
                self.entries
                    .insert(name.clone(), (entry(FileKind::Whiteout), None));
            } else if name.starts_with("dev/")
                && (file_type.is_char_device() || file_type.is_block_device())
            {
                continue;
            } else {
                return Err(ImageError::BadPath {
                    path: path.display().to_string(),
                    why: "only regular files, directories and symlinks can be in an image",
                });
            }
        }
        Ok(())
    }

    fn add_parents(&mut self, path: &str, below: &FileManifest) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            let entry = match below.get(&prefix) {
                Some(existing) if existing.kind == FileKind::Dir => existing.clone(),
                _ => FileEntry {
                    path: prefix.clone(),
                    kind: FileKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    sha256: None,
                    link: None,
                },
            };
            self.entries.entry(prefix.clone()).or_insert((entry, None));
        }
    }

    /// Writes the layer as a tar stream into `out`: entries in `files()` order, every header
    /// fixed but for content, mtime `mtime`. Fails if a file changed since it was planned.
    pub(crate) fn write_tar<W: Write>(
        &self,
        out: W,
        mtime: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<W, ImageError> {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        for entry in self.files() {
            let key = match entry.kind {
                FileKind::Opaque => format!("{}/.wh..wh..opq", entry.path),
                _ => entry.path.clone(),
            };
            let source = self.entries.get(&key).and_then(|(_, s)| s.as_ref());
            write_entry(&mut builder, &entry, source, mtime)?;
            progress(entry.size);
        }
        builder
            .into_inner()
            .map_err(ImageError::io("finish layer", "<layer>"))
    }
}

fn is_marker(entry: &FileEntry) -> bool {
    matches!(entry.kind, FileKind::Whiteout | FileKind::Opaque)
}

fn write_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    entry: &FileEntry,
    source: Option<&PathBuf>,
    mtime: u64,
) -> Result<(), ImageError> {
    let mut header = tar::Header::new_gnu();
    header.set_uid(entry.uid.into());
    header.set_gid(entry.gid.into());
    header.set_mtime(mtime);
    header.set_mode(entry.mode);
    header.set_size(0);
    let path = &entry.path;
    let written = match entry.kind {
        FileKind::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut header, format!("{path}/"), io::empty())
        }
        FileKind::File => {
            let src = source.expect("files have a source");
            let file = fs::File::open(src).map_err(ImageError::io("open", src))?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(entry.size);
            let mut reader = HashingReader::new(file.take(entry.size));
            builder
                .append_data(&mut header, path, &mut reader)
                .and_then(|()| unchanged(&reader, entry))
        }
        FileKind::Symlink => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            let target = entry.link.as_deref().unwrap_or_default();
            builder.append_link(&mut header, path, target)
        }
        FileKind::Whiteout | FileKind::Opaque => {
            let name = whiteout_name(entry);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, io::empty())
        }
    };
    written.map_err(ImageError::io("write layer entry", path))
}

/// The OCI name of a deletion marker.
fn whiteout_name(entry: &FileEntry) -> String {
    match entry.kind {
        FileKind::Opaque if entry.path.is_empty() => ".wh..wh..opq".into(),
        FileKind::Opaque => format!("{}/.wh..wh..opq", entry.path),
        _ => match entry.path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{}", entry.path),
        },
    }
}

/// Proves a file did not change between planning (when it was hashed) and writing.
fn unchanged<R>(reader: &HashingReader<R>, entry: &FileEntry) -> io::Result<()> {
    if reader.read != entry.size || Some(&reader.digest()) != entry.sha256.as_ref() {
        return Err(io::Error::other(
            "the file changed while the image was baking: bake again",
        ));
    }
    Ok(())
}

/// Whether overlayfs marked directory `path` opaque.
fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 4];
    // SAFETY: both pointers are valid for the given lengths; lgetxattr writes at most 4 bytes.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Copies sources into a plan with the copy step's owner and mode.
struct Copier<'a> {
    context: &'a Path,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
    hashes: &'a mut StatCache,
    plan: &'a mut LayerPlan,
}

impl Copier<'_> {
    fn entry(&self, path: &str, kind: FileKind, mode: u32) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind,
            mode,
            uid: self.uid,
            gid: self.gid,
            size: 0,
            sha256: None,
            link: None,
        }
    }

    fn tree(&mut self, src: &Path, dst: &str) -> Result<(), ImageError> {
        if !dst.is_empty() {
            let dir = self.entry(dst, FileKind::Dir, 0o755);
            self.plan.entries.insert(dst.to_string(), (dir, None));
        }
        for child in sorted_children(src)? {
            let path = child.path();
            let name = utf8_relative(src, &path)?;
            let child_dst = if dst.is_empty() {
                name
            } else {
                format!("{dst}/{name}")
            };
            let meta = fs::symlink_metadata(&path).map_err(ImageError::io("stat", &path))?;
            if meta.is_dir() {
                self.tree(&path, &child_dst)?;
            } else {
                self.one(&path, child_dst, &meta)?;
            }
        }
        Ok(())
    }

    fn one(&mut self, src: &Path, dst: String, meta: &fs::Metadata) -> Result<(), ImageError> {
        let entry = if meta.file_type().is_symlink() {
            let target = fs::read_link(src).map_err(ImageError::io("read link", src))?;
            self.check_link(src, &target)?;
            FileEntry {
                link: Some(utf8(&target, src)?.to_string()),
                ..self.entry(&dst, FileKind::Symlink, 0o777)
            }
        } else if meta.is_file() {
            // Only the executable bit of the source matters: the rest is normalized, so that
            // clones with different umasks bake the same image.
            let executable = meta.permissions().mode() & 0o111 != 0;
            let mode = self.mode.unwrap_or(if executable { 0o755 } else { 0o644 });
            FileEntry {
                size: meta.size(),
                sha256: Some(self.hashes.sha256(src, meta)?),
                ..self.entry(&dst, FileKind::File, mode)
            }
        } else {
            return Err(ImageError::BadPath {
                path: src.display().to_string(),
                why: "only regular files, directories and symlinks can be copied",
            });
        };
        let source = (entry.kind == FileKind::File).then(|| src.to_path_buf());
        self.plan.entries.insert(dst, (entry, source));
        Ok(())
    }

    /// A copied symlink must stay inside the build context: an absolute target, or one that
    /// climbs out, would name a file of the baking machine, not of the image.
    fn check_link(&self, link: &Path, target: &Path) -> Result<(), ImageError> {
        let escapes = || ImageError::Escapes {
            path: format!("{} -> {}", link.display(), target.display()),
            context: self.context.to_path_buf(),
        };
        if target.is_absolute() {
            return Err(escapes());
        }
        let mut resolved = link.parent().unwrap_or(Path::new("")).to_path_buf();
        for component in target.components() {
            match component {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(part) => resolved.push(part),
                _ => {}
            }
        }
        if !resolved.starts_with(self.context) {
            return Err(escapes());
        }
        Ok(())
    }
}

/// `context/relative`, refusing anything that resolves outside `context` (`..`, or a symlink
/// that points out).
fn inside_context(context: &Path, relative: &str) -> Result<PathBuf, ImageError> {
    let joined = context.join(relative);
    let resolved = match fs::canonicalize(&joined) {
        Ok(path) => path,
        Err(_) => {
            return Err(ImageError::MissingSource {
                path: joined,
                context: context.to_path_buf(),
            });
        }
    };
    if !resolved.starts_with(context) {
        return Err(ImageError::Escapes {
            path: relative.to_string(),
            context: context.to_path_buf(),
        });
    }
    Ok(resolved)
}

fn sorted_children(dir: &Path) -> Result<Vec<fs::DirEntry>, ImageError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(ImageError::io("read directory", dir))?
        .collect::<Result<_, _>>()
        .map_err(ImageError::io("read directory", dir))?;
    children.sort_by_key(|e| e.file_name());
    Ok(children)
}

fn utf8<'a>(text: &'a Path, at: &Path) -> Result<&'a str, ImageError> {
    text.to_str().ok_or(ImageError::BadPath {
        path: at.display().to_string(),
        why: "names must be UTF-8",
    })
}

fn utf8_relative(root: &Path, path: &Path) -> Result<String, ImageError> {
    let relative = path.strip_prefix(root).expect("child of root");
    Ok(utf8(relative, path)?.to_string())
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

    #[test]
    fn whiteouts_are_named_as_oci_defines() {
        let marker = |path: &str, kind| FileEntry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            sha256: None,
            link: None,
        };
        assert_eq!(
            whiteout_name(&marker("etc/a", FileKind::Whiteout)),
            "etc/.wh.a"
        );
        assert_eq!(whiteout_name(&marker("top", FileKind::Whiteout)), ".wh.top");
        assert_eq!(
            whiteout_name(&marker("var", FileKind::Opaque)),
            "var/.wh..wh..opq"
        );
    }
}
