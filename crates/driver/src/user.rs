//! The image's `User` (`name`, `uid`, `name:group`, `uid:gid`) resolved in the image's own
//! `/etc/passwd` and `/etc/group`, read through the root (never the host's files, even if the
//! image links them there), as Docker resolves it.

use std::io::Read;
use std::path::Path;

use pathrs::Root;
use pathrs::flags::OpenFlags;

/// Who the instance's process runs as, inside its user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    /// Groups of `/etc/group` that list the user by name.
    pub groups: Vec<u32>,
}

/// Databases larger than this are not read (a hostile image could hold a huge file).
const MAX_DATABASE: u64 = 4 << 20;

/// Resolves `spec` in the image at `root`; `""` is root.
pub(crate) fn resolve(root: &Path, spec: &str) -> Result<User, String> {
    if spec.is_empty() {
        return Ok(User {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        });
    }
    let passwd = database(root, "/etc/passwd");
    let group = database(root, "/etc/group");
    resolve_in(spec, &passwd, &group)
}

fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let entry = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let (name, uid, gid) = (fields.first()?, fields.get(2)?, fields.get(3)?);
        let matches = *name == user_part || (user_part.parse::<u32>().ok() == uid.parse().ok());
        matches.then(|| Some((name.to_string(), uid.parse().ok()?, gid.parse().ok()?)))?
    });
    let (name, uid, mut gid) = match (entry, user_part.parse::<u32>()) {
        (Some(entry), _) => entry,
        (None, Ok(uid)) => (String::new(), uid, 0),
        (None, Err(_)) => {
            return Err(format!(
                "user {user_part:?} is not in the image's /etc/passwd (use a number, or add it)"
            ));
        }
    };
    if let Some(group_part) = group_part {
        gid = match group_part.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .find_map(|line| {
                    let fields: Vec<&str> = line.split(':').collect();
                    (fields.first() == Some(&group_part))
                        .then(|| fields.get(2)?.parse().ok())
                        .flatten()
                })
                .ok_or_else(|| format!("group {group_part:?} is not in the image's /etc/group"))?,
        };
    }
    let groups = if name.is_empty() {
        Vec::new()
    } else {
        group
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let members = fields.get(3)?;
                let id: u32 = fields.get(2)?.parse().ok()?;
                (id != gid && members.split(',').any(|m| m == name)).then_some(id)
            })
            .collect()
    };
    Ok(User { uid, gid, groups })
}

/// A file of the image read through its root; empty when missing or unreadable.
fn database(root: &Path, path: &str) -> String {
    let read = || -> Option<String> {
        let root = Root::open(root).ok()?;
        let file = root.resolve(path).ok()?.reopen(OpenFlags::O_RDONLY).ok()?;
        let mut text = String::new();
        file.take(MAX_DATABASE).read_to_string(&mut text).ok()?;
        Some(text)
    };
    read().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\nnginx:x:101:101::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\nnginx:x:101:\nweb:x:500:nginx,www-data\n";

    #[test]
    fn names_numbers_and_groups_resolve_as_docker_does() {
        let user = |spec| resolve_in(spec, PASSWD, GROUP);
        assert_eq!(
            user("www-data").unwrap(),
            User {
                uid: 33,
                gid: 33,
                groups: vec![500]
            }
        );
        assert_eq!(user("101").unwrap().gid, 101);
        assert_eq!(
            user("1234").unwrap(),
            User {
                uid: 1234,
                gid: 0,
                groups: vec![]
            }
        );
        assert_eq!(user("nginx:web").unwrap().gid, 500);
        assert_eq!(user("nginx:7").unwrap().gid, 7);
        assert!(user("nobody").unwrap_err().contains("/etc/passwd"));
        assert!(user("nginx:nogroup").unwrap_err().contains("/etc/group"));
    }

    #[test]
    fn the_databases_are_read_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        // An image whose passwd links to the host's: resolved inside the root, it is missing.
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        assert_eq!(database(dir.path(), "/etc/passwd"), "");
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        assert_eq!(database(dir.path(), "/etc/group"), GROUP);
        assert!(resolve(dir.path(), "root").is_err());
        assert_eq!(resolve(dir.path(), "").unwrap().uid, 0);
    }
}
