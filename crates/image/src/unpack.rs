//! Applying layers to a directory, safely: every path of a layer is resolved inside the root
//! (openat2 `RESOLVE_IN_ROOT` through `pathrs`), so no entry, whiteout or link can reach a
//! file outside it, whatever symlinks earlier entries made. Absolute paths, `..` and hard
//! links that leave the root are refused with the entry's name; a layer that expands past the
//! size limit is refused.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use pathrs::Root;
use pathrs::flags::OpenFlags;

use crate::ImageError;

/// Entries a layer may hold (bounds the time spent on a hostile archive).
const MAX_ENTRIES: u64 = 2_000_000;

/// How an unpacked root is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootLayout {
    /// Added to every owner: the host uid and gid that the instance's uid and gid 0 map to in
    /// its user namespace. 0: owners as in the image.
    pub id_offset: u32,
    /// Keep the image's write bits (the root is mounted read-only under a writable layer);
    /// otherwise every write bit is removed, for instances that run from the root itself.
    pub keep_write_bits: bool,
    /// Keep set-uid and set-gid bits. Only where owners are shifted into a user namespace's
    /// range (a set-uid-root file then belongs to an unprivileged host uid), or in a bake's
    /// own scratch tree.
    pub keep_set_id: bool,
}

impl RootLayout {
    /// Owners as in the image, no write bits, no set-id bits: what the process driver runs from.
    pub const HOST: RootLayout = RootLayout {
        id_offset: 0,
        keep_write_bits: false,
        keep_set_id: false,
    };

    /// Exactly as the layers say (a bake's scratch tree for `run` steps).
    pub(crate) const FAITHFUL: RootLayout = RootLayout {
        id_offset: 0,
        keep_write_bits: true,
        keep_set_id: true,
    };

    /// Owners shifted by `offset` (a user namespace's mapping), modes as in the image; set-id
    /// bits only when the owners are shifted.
    pub fn mapped(offset: u32) -> RootLayout {
        RootLayout {
            id_offset: offset,
            keep_write_bits: true,
            keep_set_id: offset > 0,
        }
    }

    /// The directory name of this layout's root of the image with hex digest `hex`.
    pub(crate) fn dir_name(&self, hex: &str) -> String {
        if *self == RootLayout::HOST {
            return hex.to_string();
        }
        let modes = match (self.keep_write_bits, self.keep_set_id) {
            (true, true) => "ws",
            (true, false) => "w",
            (false, true) => "s",
            (false, false) => "r",
        };
        format!("{hex}-{modes}{}", self.id_offset)
    }

    /// The mode a file of `mode` gets on disk.
    pub(crate) fn mode(&self, mode: u32) -> u32 {
        let mut mode = mode & 0o7777;
        if !self.keep_set_id {
            mode &= !0o6000;
        }
        if !self.keep_write_bits {
            mode &= !0o222;
        }
        mode
    }
}

/// Limits on what one layer may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content a layer may hold once unpacked.
    pub max_layer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_bytes: 16 << 30,
        }
    }
}

/// The variable that sets [`Limits::max_layer_bytes`] for every command.
pub const MAX_LAYER_SIZE_VAR: &str = "PHOENIX_MAX_LAYER_SIZE";

impl Limits {
    /// The default limits, or those `PHOENIX_MAX_LAYER_SIZE` sets (bytes, or a number and
    /// KiB, MiB, GiB or TiB).
    pub fn from_env() -> Result<Limits, ImageError> {
        match std::env::var(MAX_LAYER_SIZE_VAR) {
            Ok(text) => Limits::parse(&text),
            Err(_) => Ok(Limits::default()),
        }
    }

    /// Limits with the layer size `text` (bytes, or a number and KiB, MiB, GiB or TiB).
    pub fn parse(text: &str) -> Result<Limits, ImageError> {
        let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let scale: u64 = match &text[digits.len()..] {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => 0,
        };
        match digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
        {
            Some(bytes) if bytes > 0 => Ok(Limits {
                max_layer_bytes: bytes,
            }),
            _ => Err(ImageError::Unsupported(format!(
                "{MAX_LAYER_SIZE_VAR}={text:?} is not a size: write bytes, or a number and KiB, MiB, GiB or TiB"
            ))),
        }
    }
}

/// What one tar entry asks for, after its path was checked.
enum Action {
    /// Delete the path (`.wh.NAME`).
    Whiteout(PathBuf),
    /// Empty the directory (`.wh..wh..opq`).
    Opaque(PathBuf),
    /// Create the entry at the path.
    Create(PathBuf),
    /// Nothing (aufs bookkeeping such as `.wh..wh.plnk`, the root itself).
    Skip,
}

/// The checked meaning of an entry: its path must be relative and must not climb with `..`;
/// a hard link's target likewise.
fn classify(entry: &tar::Entry<impl Read>, layer: &str) -> Result<Action, ImageError> {
    let raw = entry.path_bytes();
    let path = checked_path(&raw, layer)?;
    if let Some(target) = entry.link_name_bytes()
        && entry.header().entry_type() == tar::EntryType::Link
    {
        checked_path(&target, layer).map_err(|e| match e {
            ImageError::UnsafeEntry { why, .. } => ImageError::UnsafeEntry {
                layer: layer.into(),
                entry: format!(
                    "{} (hard link to {})",
                    String::from_utf8_lossy(&raw),
                    String::from_utf8_lossy(&target)
                ),
                why,
            },
            other => other,
        })?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
    Ok(if name == ".wh..wh..opq" {
        Action::Opaque(parent)
    } else if name.starts_with(".wh..wh.") {
        Action::Skip
    } else if let Some(hidden) = name.strip_prefix(".wh.") {
        Action::Whiteout(parent.join(hidden))
    } else if path.as_os_str().is_empty() {
        Action::Skip
    } else {
        Action::Create(path)
    })
}

/// `raw` as a path relative to the root, or why it is refused.
fn checked_path(raw: &[u8], layer: &str) -> Result<PathBuf, ImageError> {
    let refuse = |why| ImageError::UnsafeEntry {
        layer: layer.into(),
        entry: String::from_utf8_lossy(raw).into_owned(),
        why,
    };
    if raw.contains(&0) {
        return Err(refuse("holds a NUL byte"));
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(
                    "is an absolute path (layer paths are relative to the root)",
                ));
            }
            Component::ParentDir => return Err(refuse("climbs out of the root with `..`")),
        }
    }
    Ok(clean)
}

/// Checks every entry of a layer without writing anything: what `import` does before it
/// accepts an archive. Returns the bytes of content the layer expands to.
pub(crate) fn check_layer<R: Read>(
    reader: R,
    layer: &str,
    limits: &Limits,
) -> Result<u64, ImageError> {
    let mut archive = tar::Archive::new(LimitedReader::new(reader, limits, layer));
    let mut expanded = 0u64;
    let mut count = 0u64;
    for entry in archive.entries().map_err(read_error(layer))? {
        let entry = entry.map_err(read_error(layer))?;
        classify(&entry, layer)?;
        count += 1;
        expanded = expanded.saturating_add(entry.header().entry_size().unwrap_or(0));
        check_limits(count, expanded, limits, layer)?;
    }
    Ok(expanded)
}

fn check_limits(count: u64, expanded: u64, limits: &Limits, layer: &str) -> Result<(), ImageError> {
    if expanded > limits.max_layer_bytes {
        return Err(ImageError::TooLarge {
            layer: layer.into(),
            limit: limits.max_layer_bytes,
        });
    }
    if count > MAX_ENTRIES {
        return Err(ImageError::UnsafeEntry {
            layer: layer.into(),
            entry: format!("entry {count}"),
            why: "the layer holds more than 2,000,000 entries",
        });
    }
    Ok(())
}

fn read_error(layer: &str) -> impl Fn(io::Error) -> ImageError + '_ {
    move |cause| ImageError::Io {
        action: "read layer",
        path: layer.into(),
        cause,
    }
}

/// Reads at most the layer limit plus room for headers, so that a hostile archive (a huge
/// GNU long name, endless padding) cannot take unbounded time or memory.
struct LimitedReader<R> {
    inner: R,
    left: u64,
    limit: u64,
    layer: String,
}

impl<R: Read> LimitedReader<R> {
    fn new(inner: R, limits: &Limits, layer: &str) -> Self {
        // Headers take 512 bytes per entry: allow a generous share on top of the content.
        let limit = limits
            .max_layer_bytes
            .saturating_add(limits.max_layer_bytes / 4)
            .saturating_add(64 << 20);
        LimitedReader {
            inner,
            left: limit,
            limit,
            layer: layer.into(),
        }
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other(format!(
                "layer {} reads past {} bytes",
                self.layer, self.limit
            )));
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..max])?;
        self.left -= read as u64;
        Ok(read)
    }
}

/// Ownership, modes and times applied to one created path.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

/// Applies layers to one root.
pub(crate) struct Unpacker {
    root: Root,
    shown: PathBuf,
    layout: RootLayout,
    limits: Limits,
    owners: bool,
    /// Directories get their final mode last, deepest first: a read-only directory must not
    /// keep its own entries out while the layers are applied.
    dirs: Vec<(PathBuf, Meta)>,
}

impl Unpacker {
    /// An unpacker into the existing directory `into`.
    pub(crate) fn new(into: &Path, layout: RootLayout, limits: Limits) -> Result<Self, ImageError> {
        let root = Root::open(into).map_err(pathrs_error("open", into))?;
        let owners = is_root();
        if layout.id_offset > 0 && !owners {
            return Err(ImageError::Unsupported(format!(
                "a root with owners shifted by {} (a user namespace's mapping) needs root",
                layout.id_offset
            )));
        }
        Ok(Unpacker {
            root,
            shown: into.to_path_buf(),
            layout,
            limits,
            owners,
            dirs: Vec::new(),
        })
    }

    /// Applies the layer tar `reader` (named `layer` in errors): whiteouts delete, opaque
    /// markers empty their directory, other entries replace what is there.
    pub(crate) fn apply<R: Read>(&mut self, reader: R, layer: &str) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(LimitedReader::new(reader, &self.limits, layer));
        let (mut count, mut expanded) = (0u64, 0u64);
        for entry in archive.entries().map_err(read_error(layer))? {
            let mut entry = entry.map_err(read_error(layer))?;
            count += 1;
            expanded = expanded.saturating_add(entry.header().entry_size().unwrap_or(0));
            check_limits(count, expanded, &self.limits, layer)?;
            match classify(&entry, layer)? {
                Action::Skip => {}
                Action::Whiteout(path) => self.remove(&path)?,
                Action::Opaque(dir) => self.empty(&dir)?,
                Action::Create(path) => self.create(&mut entry, &path, layer)?,
            }
        }
        Ok(())
    }

    /// Gives every directory its final owner and mode, deepest first.
    pub(crate) fn finish(mut self) -> Result<(), ImageError> {
        self.dirs
            .sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        let dirs = std::mem::take(&mut self.dirs);
        for (path, meta) in dirs {
            // A later layer may have removed or replaced it.
            let Ok(handle) = self.root.resolve_nofollow(&path) else {
                continue;
            };
            let Ok(dir) = handle.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY) else {
                continue;
            };
            self.set_meta(&dir, &path, meta)?;
        }
        Ok(())
    }

    fn meta(&self, header: &tar::Header) -> Meta {
        Meta {
            mode: self.layout.mode(header.mode().unwrap_or(0o644)),
            uid: (header.uid().unwrap_or(0) as u32).saturating_add(self.layout.id_offset),
            gid: (header.gid().unwrap_or(0) as u32).saturating_add(self.layout.id_offset),
            mtime: header.mtime().unwrap_or(0) as i64,
        }
    }

    fn create<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        path: &Path,
        layer: &str,
    ) -> Result<(), ImageError> {
        let meta = self.meta(entry.header());
        let kind = entry.header().entry_type();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.mkdir_parents(parent)?;
        }
        if kind.is_dir() {
            return self.make_dir(path, meta);
        }
        self.remove(path)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut file = self
                    .root
                    .create_file(
                        path,
                        OpenFlags::O_WRONLY | OpenFlags::O_CREAT | OpenFlags::O_EXCL,
                        &fs::Permissions::from_mode(0o600),
                    )
                    .map_err(pathrs_error("create", &self.shown.join(path)))?;
                io::copy(entry, &mut file).map_err(read_error(layer))?;
                self.set_meta(&file, path, meta)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(read_error(layer))?
                    .unwrap_or_default()
                    .into_owned();
                self.root
                    .create(path, &pathrs::InodeType::Symlink(target))
                    .map_err(pathrs_error("create symlink", &self.shown.join(path)))?;
                self.chown_link(path, meta)
            }
            tar::EntryType::Link => {
                let raw = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = checked_path(&raw, layer)?;
                self.root
                    .create(path, &pathrs::InodeType::Hardlink(target))
                    .map_err(pathrs_error("create hard link", &self.shown.join(path)))
            }
            // Device nodes and FIFOs are never part of a root (runtimes provide /dev, and file
            // manifests leave them out). Extension headers are read by the tar reader itself.
            _ => Ok(()),
        }
    }

    /// Creates missing parents (a layer need not list them) as plain 0755 directories.
    /// Symlinks to directories are followed, inside the root (a merged `/usr`'s `lib`).
    fn mkdir_parents(&mut self, parent: &Path) -> Result<(), ImageError> {
        let mut walked = PathBuf::new();
        for part in parent.components() {
            walked.push(part);
            if self.root.resolve(&walked).is_ok_and(|h| is_dir(&h)) {
                continue;
            }
            // A file or a dangling link in the way is replaced, as a directory entry would.
            self.remove(&walked)?;
            let meta = Meta {
                mode: self.layout.mode(0o755),
                uid: self.layout.id_offset,
                gid: self.layout.id_offset,
                mtime: 0,
            };
            self.make_dir(&walked, meta)?;
        }
        Ok(())
    }

    fn make_dir(&mut self, path: &Path, meta: Meta) -> Result<(), ImageError> {
        match self.root.resolve_nofollow(path) {
            Ok(handle) if is_dir(&handle) => {}
            Ok(_) => {
                self.remove(path)?;
                self.mkdir(path)?;
            }
            Err(_) => self.mkdir(path)?,
        }
        self.dirs.retain(|(p, _)| p != path);
        self.dirs.push((path.to_path_buf(), meta));
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> Result<(), ImageError> {
        self.root
            .create(
                path,
                &pathrs::InodeType::Directory(fs::Permissions::from_mode(0o700)),
            )
            .map_err(pathrs_error("create directory", &self.shown.join(path)))
    }

    /// Removes `path` (a whole tree for a directory) if it exists; never follows its last
    /// component.
    fn remove(&self, path: &Path) -> Result<(), ImageError> {
        if path.as_os_str().is_empty() || self.root.resolve_nofollow(path).is_err() {
            return Ok(());
        }
        match self.root.remove_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == pathrs::error::ErrorKind::OsError(Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(pathrs_error("remove", &self.shown.join(path))(e)),
        }
    }

    /// Empties the directory `dir` (an opaque whiteout); a missing one is nothing to empty.
    fn empty(&self, dir: &Path) -> Result<(), ImageError> {
        let Ok(handle) = self.root.resolve(dir) else {
            return Ok(());
        };
        let Ok(file) = handle.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY) else {
            return Ok(());
        };
        let names: Vec<_> = fs::read_dir(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(ImageError::io("read directory", self.shown.join(dir)))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        for name in names {
            self.remove(&dir.join(name))?;
        }
        Ok(())
    }

    /// Owner (when unpacking as root), then mode (a chown clears set-id bits), then mtime.
    fn set_meta(&self, file: &fs::File, path: &Path, meta: Meta) -> Result<(), ImageError> {
        let shown = || self.shown.join(path);
        if self.owners {
            std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
                .map_err(ImageError::io("chown", shown()))?;
        }
        file.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(ImageError::io("chmod", shown()))?;
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime.max(0) as u64);
        file.set_times(fs::FileTimes::new().set_modified(time).set_accessed(time))
            .map_err(ImageError::io("set times of", shown()))
    }

    fn chown_link(&self, path: &Path, meta: Meta) -> Result<(), ImageError> {
        if !self.owners {
            return Ok(());
        }
        let handle = self
            .root
            .resolve_nofollow(path)
            .map_err(pathrs_error("open", &self.shown.join(path)))?;
        // SAFETY: fchownat on a descriptor we own, with an empty C string path.
        let result = unsafe {
            libc::fchownat(
                handle.as_fd().as_raw_fd(),
                c"".as_ptr(),
                meta.uid,
                meta.gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if result != 0 {
            return Err(ImageError::io("chown", self.shown.join(path))(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// True when the handle (an `O_PATH` descriptor, never followed) is a directory.
fn is_dir(handle: &pathrs::Handle) -> bool {
    // SAFETY: fstat fills a zeroed stat buffer from a descriptor we own.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(handle.as_fd().as_raw_fd(), &mut stat) == 0
            && stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

fn pathrs_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(pathrs::error::Error) -> ImageError + 'a {
    move |e| ImageError::Io {
        action,
        path: path.to_path_buf(),
        cause: match e.kind() {
            pathrs::error::ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno),
            _ => io::Error::other(e.to_string()),
        },
    }
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes a file or a whole tree, making read-only directories writable first. For trees
/// Phoenix made itself (scratch directories, roots); never given a path from an image.
pub(crate) fn remove_path(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
            if let Ok(children) = fs::read_dir(path) {
                for child in children.flatten() {
                    remove_path(&child.path());
                }
            }
            let _ = fs::remove_dir(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests;
