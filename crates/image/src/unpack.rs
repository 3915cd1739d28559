//! Applying layers to a directory: OCI whiteouts delete, opaque markers empty a directory.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::ImageError;

/// Applies the layer tar `reader` to `into`: whiteouts delete, opaque markers empty their
/// directory, other entries replace what is there.
pub(crate) fn apply_layer<R: Read>(reader: R, into: &Path) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(is_root());
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let entries = archive
        .entries()
        .map_err(ImageError::io("read layer of", into))?;
    for entry in entries {
        let mut entry = entry.map_err(ImageError::io("read layer of", into))?;
        let path = entry
            .path()
            .map_err(ImageError::io("read layer of", into))?
            .into_owned();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = into.join(path.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            if let Ok(children) = fs::read_dir(&parent) {
                for child in children.flatten() {
                    remove_path(&child.path());
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_path(&parent.join(hidden));
            continue;
        }
        let target = into.join(&path);
        if entry.header().entry_type() != tar::EntryType::Directory {
            if let Ok(meta) = fs::symlink_metadata(&target) {
                if meta.is_dir() {
                    remove_path(&target);
                }
            }
        }
        entry
            .unpack_in(into)
            .map_err(ImageError::io("unpack layer into", into))?;
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes a file or a whole tree, making read-only directories writable first.
pub(crate) fn remove_path(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
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
