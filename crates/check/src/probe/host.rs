//! Users, groups, packages, services, processes, kernel parameters and mounts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value as Json, json};

use super::{System, Target};
use crate::suite::Check;

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Installed packages and their versions, from the target's package database.
#[derive(Debug, Clone)]
pub enum Packages {
    /// dpkg or apk: the database file, read once.
    Listed(BTreeMap<String, Vec<String>>),
    /// rpm: asked per package (`rpm -q`).
    Rpm,
    None,
}

#[derive(Debug, Clone)]
pub struct Mount {
    pub point: String,
    pub source: String,
    pub filesystem: String,
    pub opts: Vec<String>,
    pub vfs_opts: Vec<String>,
}

fn read_table(target: &Target, file: &str) -> Result<String, String> {
    std::fs::read_to_string(target.path(file)).map_err(|e| format!("cannot read {file}: {e}"))
}

pub fn read_users(target: &Target) -> Result<Vec<User>, String> {
    let text = read_table(target, "/etc/passwd")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(User {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5)?.to_string(),
                shell: f.get(6)?.to_string(),
            })
        })
        .collect())
}

pub fn read_groups(target: &Target) -> Result<Vec<Group>, String> {
    let text = read_table(target, "/etc/group")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect())
}

/// dpkg, then apk, then rpm: the first database the target has.
pub fn read_packages(target: &Target) -> Result<Packages, String> {
    if let Ok(text) = std::fs::read_to_string(target.path("/var/lib/dpkg/status")) {
        return Ok(Packages::Listed(parse_stanzas(
            &text,
            "Package: ",
            "Version: ",
            |s| {
                s.lines()
                    .any(|l| l.starts_with("Status: ") && l.ends_with(" installed"))
            },
        )));
    }
    if let Ok(text) = std::fs::read_to_string(target.path("/lib/apk/db/installed")) {
        return Ok(Packages::Listed(parse_stanzas(&text, "P:", "V:", |_| true)));
    }
    if target.path("/var/lib/rpm").is_dir() && target.is_host() {
        return Ok(Packages::Rpm);
    }
    Ok(Packages::None)
}

/// Blank-line separated stanzas of `Key: value` lines (dpkg's status file, apk's database).
fn parse_stanzas(
    text: &str,
    name_key: &str,
    version_key: &str,
    installed: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let mut packages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        if let (Some(name), Some(version)) = (field(name_key), field(version_key))
            && installed(stanza)
        {
            packages
                .entry(name.to_string())
                .or_default()
                .push(version.to_string());
        }
    }
    packages
}

pub fn read_processes() -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let dir = std::fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
    for entry in dir.flatten() {
        let path = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(comm) = std::fs::read_to_string(path.join("comm")) {
            names.push(comm.trim_end().to_string());
        }
        // comm is cut at 15 bytes; argv[0]'s file name has the whole name.
        if let Ok(cmdline) = std::fs::read(path.join("cmdline")) {
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0);
            if let Some(name) = Path::new(argv0.as_ref()).file_name() {
                names.push(name.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

pub fn read_mounts() -> Result<Vec<Mount>, String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read mountinfo: {e}"))?;
    let list = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
    Ok(text
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let f: Vec<&str> = before.split(' ').collect();
            let g: Vec<&str> = after.split(' ').collect();
            Some(Mount {
                point: unescape_octal(f.get(4)?),
                opts: list(f.get(5)?),
                filesystem: g.first()?.to_string(),
                source: unescape_octal(g.get(1)?),
                vfs_opts: list(g.get(2)?),
            })
        })
        .collect())
}

/// mountinfo writes spaces and tabs in paths as `\040`, `\011`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or(""), 8) {
            Ok(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out + rest
}

pub fn user<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        let users = system.users()?;
        let found = users.iter().find(|u| u.name == check.target());
        if attribute == "exists" {
            return Ok(json!(found.is_some()));
        }
        let user = found.ok_or_else(|| format!("user {} does not exist", check.target()))?;
        Ok(match attribute {
            "uid" => json!(user.uid),
            "gid" => json!(user.gid),
            "home" => json!(user.home),
            "shell" => json!(user.shell),
            _ => {
                let groups = system.groups()?;
                let mut names: Vec<&str> = groups
                    .iter()
                    .filter(|g| g.gid == user.gid || g.members.contains(&user.name))
                    .map(|g| g.name.as_str())
                    .collect();
                names.dedup();
                json!(names)
            }
        })
    }
}

pub fn group<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        let found = system.groups()?.iter().find(|g| g.name == check.target());
        match (attribute, found) {
            ("exists", found) => Ok(json!(found.is_some())),
            (_, Some(group)) => Ok(json!(group.gid)),
            (_, None) => Err(format!("group {} does not exist", check.target())),
        }
    }
}

pub fn package<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        let versions: Vec<String> = match system.packages()? {
            Packages::Listed(all) => all.get(check.target()).cloned().unwrap_or_default(),
            Packages::Rpm => rpm_versions(check.target()),
            Packages::None => return Err("no package database (dpkg, apk or rpm) found".into()),
        };
        match attribute {
            "installed" => Ok(json!(!versions.is_empty())),
            _ if versions.is_empty() => Err(format!("package {} is not installed", check.target())),
            _ => Ok(json!(versions)),
        }
    }
}

fn rpm_versions(name: &str) -> Vec<String> {
    let output = Command::new("rpm")
        .args([
            "-q",
            "--nosignature",
            "--nodigest",
            "--qf",
            "%{VERSION}-%{RELEASE}\\n",
            name,
        ])
        .stderr(Stdio::null())
        .output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

pub fn process<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |_| {
        Ok(json!(
            system.processes()?.contains(&check.target().to_string())
        ))
    }
}

/// systemd when it runs this machine; otherwise SysV init scripts under the target's root.
pub fn service<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    let target = system.target;
    let systemd = target.is_host() && Path::new("/run/systemd/system").is_dir();
    move |attribute| {
        let name = check.target();
        if systemd {
            let verb = if attribute == "enabled" {
                "is-enabled"
            } else {
                "is-active"
            };
            return Ok(json!(succeeds(
                Command::new("systemctl").args(["-q", verb, name])
            )));
        }
        if attribute == "enabled" {
            return Ok(json!((2..=5).any(|level| {
                let dir = target.path(&format!("/etc/rc{level}.d"));
                std::fs::read_dir(dir).is_ok_and(|entries| {
                    entries.flatten().any(|e| {
                        let file = e.file_name().to_string_lossy().into_owned();
                        file.starts_with('S') && file.get(3..) == Some(name)
                    })
                })
            })));
        }
        if !target.is_host() {
            return Err("the running state of a service is only known on the host".into());
        }
        let script = format!("/etc/init.d/{name}");
        if !Path::new(&script).exists() {
            return Ok(json!(false));
        }
        Ok(json!(succeeds(Command::new(&script).arg("status"))))
    }
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn kernel_param(check: &Check) -> impl Fn(&str) -> Result<Json, String> + '_ {
    move |_| {
        let path = format!("/proc/sys/{}", check.target().replace('.', "/"));
        let value = std::fs::read_to_string(&path)
            .map_err(|e| format!("kernel parameter {}: {e}", check.target()))?;
        // Multi-value parameters are tab-separated; sysctl prints them the same way.
        Ok(json!(value.trim_end_matches('\n')))
    }
}

pub fn mount<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        // The last mount on a point is the one that shows.
        let found = system
            .mounts()?
            .iter()
            .rev()
            .find(|m| m.point == check.target());
        if attribute == "exists" {
            return Ok(json!(found.is_some()));
        }
        let mount = found.ok_or_else(|| format!("nothing is mounted on {}", check.target()))?;
        Ok(match attribute {
            "opts" => json!(mount.opts),
            "vfs-opts" => json!(mount.vfs_opts),
            "source" => json!(mount.source),
            "filesystem" => json!(mount.filesystem),
            _ => json!(usage_percent(check.target())?),
        })
    }
}

/// Used space in percent, as `df` computes it.
fn usage_percent(point: &str) -> Result<u64, String> {
    let path = std::ffi::CString::new(point).map_err(|_| "bad path".to_string())?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(format!(
            "statvfs {point}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let used = stat.f_blocks.saturating_sub(stat.f_bfree);
    let total = used + stat.f_bavail;
    Ok(if total == 0 {
        0
    } else {
        (used * 100).div_ceil(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_and_apk_databases() {
        let dpkg = "Package: a\nStatus: install ok installed\nVersion: 1.0\n\nPackage: b\nStatus: deinstall ok config-files\nVersion: 2\n";
        let parsed = parse_stanzas(dpkg, "Package: ", "Version: ", |s| {
            s.lines()
                .any(|l| l.starts_with("Status: ") && l.ends_with(" installed"))
        });
        assert_eq!(parsed.get("a"), Some(&vec!["1.0".to_string()]));
        assert!(!parsed.contains_key("b"));
        let apk = parse_stanzas(
            "P:musl\nV:1.2.4-r2\n\nP:busybox\nV:1.36\n",
            "P:",
            "V:",
            |_| true,
        );
        assert_eq!(apk.len(), 2);
        assert_eq!(unescape_octal("/mnt/a\\040b"), "/mnt/a b");
    }
}
