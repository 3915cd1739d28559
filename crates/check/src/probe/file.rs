//! `file`: existence, type, mode, owner, size, contents, digests and link targets.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256, Sha512};

use super::System;
use crate::suite::Check;

/// How many symlinks a path may pass through, as the kernel's limit.
const MAX_LINKS: usize = 40;

pub fn observe<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    let written = check.target().to_string();
    let path = system.target.path(&written);
    let link = std::fs::symlink_metadata(&path);
    let followed = std::fs::metadata(&path);
    move |attribute| {
        if attribute == "exists" {
            return Ok(Json::Bool(link.is_ok()));
        }
        let link = link.as_ref().map_err(|e| format!("{written}: {e}"))?;
        match attribute {
            "filetype" => return Ok(json!(file_type(link))),
            "linked-to" => {
                let target = std::fs::read_link(&path)
                    .map_err(|e| format!("{written}: not a symlink ({e})"))?;
                return Ok(json!(target.to_string_lossy()));
            }
            _ => {}
        }
        let meta = followed.as_ref().map_err(|e| format!("{written}: {e}"))?;
        Ok(match attribute {
            "mode" => json!(format!("{:04o}", meta.mode() & 0o7777)),
            "size" => json!(meta.size()),
            "uid" => json!(meta.uid()),
            "gid" => json!(meta.gid()),
            "owner" => json!(name_of_user(system, meta.uid())),
            "group" => json!(name_of_group(system, meta.gid())),
            "contents" | "contains" => json!(String::from_utf8_lossy(&read(&path, &written)?)),
            "md5" => json!(format!("{:x}", md5::Md5::digest(read(&path, &written)?))),
            "sha256" => json!(format!("{:x}", Sha256::digest(read(&path, &written)?))),
            "sha512" => json!(format!("{:x}", Sha512::digest(read(&path, &written)?))),
            other => return Err(format!("file has no attribute {other}")),
        })
    }
}

fn read(path: &Path, written: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {written}: {e}"))
}

fn file_type(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "file"
    } else if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "pipe"
    } else if t.is_char_device() {
        "character-device"
    } else {
        "block-device"
    }
}

/// The user's name, or the number when the target has no such user.
fn name_of_user(system: &System, uid: u32) -> String {
    system
        .users()
        .ok()
        .and_then(|users| users.iter().find(|u| u.uid == uid).map(|u| u.name.clone()))
        .unwrap_or_else(|| uid.to_string())
}

fn name_of_group(system: &System, gid: u32) -> String {
    system
        .groups()
        .ok()
        .and_then(|groups| groups.iter().find(|g| g.gid == gid).map(|g| g.name.clone()))
        .unwrap_or_else(|| gid.to_string())
}

/// Resolves `path` as if `root` were `/`: absolute symlink targets and `..` stay inside the
/// root. The last component is not followed, so that `filetype` and `linked-to` see the link.
pub fn resolve_in_root(root: &Path, path: &str) -> PathBuf {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        let is_last = pending.is_empty();
        match std::fs::read_link(&candidate) {
            Ok(target) if !is_last && links < MAX_LINKS => {
                links += 1;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                pending.extend(components(&target).into_iter().rev());
            }
            _ => resolved.push(part),
        }
    }
    root.join(resolved.iter().collect::<PathBuf>())
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("usr/bin/tool"), "x").unwrap();
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", r.join("usr/bin/escape")).unwrap();
        assert_eq!(resolve_in_root(r, "/bin/tool"), r.join("usr/bin/tool"));
        assert_eq!(
            resolve_in_root(r, "/../../bin/tool"),
            r.join("usr/bin/tool")
        );
        // The last component is the link itself.
        assert_eq!(resolve_in_root(r, "/bin"), r.join("bin"));
        assert_eq!(
            resolve_in_root(r, "/usr/bin/escape/x"),
            r.join("etc/passwd/x")
        );
    }
}
