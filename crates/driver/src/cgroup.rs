//! An instance's cgroup, read and ended from outside: CPU and memory use, OOM kills, killing
//! every process in it, removing it. Works on cgroup v1 (one hierarchy per controller, this
//! machine) and v2 (one unified hierarchy, most hosts today); hybrid hosts count as v1, as
//! runc and libcontainer see them. The runtimes create the cgroups and apply the limits.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Usage;

/// Which cgroup hierarchy the host uses for its controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The v1 controllers a runtime may create an instance's cgroup in.
const V1_CONTROLLERS: &[&str] = &[
    "memory",
    "cpu",
    "cpuacct",
    "cpuset",
    "pids",
    "freezer",
    "devices",
    "blkio",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
];

/// The cgroups of one Phoenix state directory's instances.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: CgroupVersion,
    /// v1: each controller's mount point; v2: the unified mount under the key `""`.
    mounts: BTreeMap<String, PathBuf>,
    /// The cgroup every instance's cgroup sits in, relative to the hierarchy's root
    /// (`phoenix/1a2b3c4d`).
    parent: String,
}

impl Cgroups {
    /// The host's cgroups as `/proc/self/mountinfo` shows them, instances placed under
    /// `parent`; `None` when no memory controller is mounted.
    pub fn detect(parent: &str) -> Option<Cgroups> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        Cgroups::from_mountinfo(&mountinfo, parent)
    }

    fn from_mountinfo(mountinfo: &str, parent: &str) -> Option<Cgroups> {
        let mut v1 = BTreeMap::new();
        let mut unified = None;
        for line in mountinfo.lines() {
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let point = before.split(' ').nth(4)?;
            let mut fields = after.split(' ');
            let (fstype, options) = (fields.next()?, fields.nth(1).unwrap_or(""));
            match fstype {
                "cgroup2" if point == "/sys/fs/cgroup" => unified = Some(PathBuf::from(point)),
                "cgroup" => {
                    for option in options.split(',') {
                        if V1_CONTROLLERS.contains(&option) {
                            v1.entry(option.to_string())
                                .or_insert_with(|| PathBuf::from(point));
                        }
                    }
                }
                _ => {}
            }
        }
        let parent = parent.trim_matches('/').to_string();
        match unified {
            Some(root) => Some(Cgroups {
                version: CgroupVersion::V2,
                mounts: [(String::new(), root)].into(),
                parent,
            }),
            None if v1.contains_key("memory") => Some(Cgroups {
                version: CgroupVersion::V1,
                mounts: v1,
                parent,
            }),
            None => None,
        }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The OCI `cgroupsPath` of instance `name`.
    pub fn path_of(&self, name: &str) -> String {
        format!("/{}/{name}", self.parent)
    }

    /// The directory of instance `name` in `controller`'s hierarchy (v2: the one hierarchy).
    fn dir(&self, controller: &str, name: &str) -> Option<PathBuf> {
        let mount = match self.version {
            CgroupVersion::V1 => self.mounts.get(controller)?,
            CgroupVersion::V2 => self.mounts.get("")?,
        };
        Some(mount.join(&self.parent).join(name))
    }

    /// True when this process may create cgroups here (root, or a delegated v2 subtree).
    pub fn writable(&self) -> bool {
        let Some(mount) = self.dir("memory", "") else {
            return false;
        };
        let mut probe = mount.clone();
        while !probe.exists() {
            if !probe.pop() {
                return false;
            }
        }
        // SAFETY: access(2) on a NUL-terminated path.
        let path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).ok();
        path.is_some_and(|p| unsafe { libc::access(p.as_ptr(), libc::W_OK) } == 0)
    }

    /// CPU time and memory in use of every process in instance `name`'s cgroup.
    pub fn usage(&self, name: &str) -> Option<Usage> {
        match self.version {
            CgroupVersion::V1 => {
                let cpu = self.dir("cpuacct", name)?;
                let memory = self.dir("memory", name)?;
                let nanos: u64 = read_number(&cpu.join("cpuacct.usage"))?;
                let used: u64 = read_number(&memory.join("memory.usage_in_bytes"))?;
                let stat = fs::read_to_string(memory.join("memory.stat")).ok()?;
                let inactive = stat_value(&stat, "total_inactive_file").unwrap_or(0);
                Some(Usage {
                    cpu_seconds: nanos as f64 / 1e9,
                    rss_bytes: used.saturating_sub(inactive),
                })
            }
            CgroupVersion::V2 => {
                let dir = self.dir("", name)?;
                let cpu = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                let micros = stat_value(&cpu, "usage_usec")?;
                let used: u64 = read_number(&dir.join("memory.current"))?;
                let stat = fs::read_to_string(dir.join("memory.stat")).ok()?;
                let inactive = stat_value(&stat, "inactive_file").unwrap_or(0);
                Some(Usage {
                    cpu_seconds: micros as f64 / 1e6,
                    rss_bytes: used.saturating_sub(inactive),
                })
            }
        }
    }

    /// How many processes of instance `name` the kernel killed for going over its memory limit.
    pub fn oom_kills(&self, name: &str) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
        };
        self.dir("memory", name)
            .and_then(|dir| fs::read_to_string(dir.join(file)).ok())
            .and_then(|text| stat_value(&text, key))
            .unwrap_or(0)
    }

    /// The processes in instance `name`'s cgroup.
    pub fn pids(&self, name: &str) -> Vec<u32> {
        let controller = match self.version {
            CgroupVersion::V1 => "memory",
            CgroupVersion::V2 => "",
        };
        self.dir(controller, name)
            .and_then(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process in instance `name`'s cgroup, new ones forked meanwhile included:
    /// `cgroup.kill` on v2, else freeze, SIGKILL each, thaw, until none is left. Returns how
    /// many were killed.
    pub fn kill_all(&self, name: &str) -> usize {
        let mut killed = 0;
        if self.version == CgroupVersion::V2
            && let Some(dir) = self.dir("", name)
            && fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            killed = self.pids(name).len();
            self.wait_empty(name);
            return killed;
        }
        for _ in 0..50 {
            let pids = self.pids(name);
            if pids.is_empty() {
                break;
            }
            self.freeze(name, true);
            for pid in &pids {
                // SAFETY: kill(2) touches no memory; a pid that is gone fails harmlessly.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
            killed += pids.len();
            self.freeze(name, false);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait_empty(name);
        killed
    }

    fn freeze(&self, name: &str, frozen: bool) {
        let (file, value) = match (self.version, frozen) {
            (CgroupVersion::V1, true) => ("freezer.state", "FROZEN"),
            (CgroupVersion::V1, false) => ("freezer.state", "THAWED"),
            (CgroupVersion::V2, true) => ("cgroup.freeze", "1"),
            (CgroupVersion::V2, false) => ("cgroup.freeze", "0"),
        };
        if let Some(dir) = self.dir("freezer", name) {
            let _ = fs::write(dir.join(file), value);
        }
    }

    fn wait_empty(&self, name: &str) {
        for _ in 0..200 {
            if self.pids(name).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes instance `name`'s (empty) cgroup from every hierarchy.
    pub fn remove(&self, name: &str) {
        let dirs: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => {
                let mut dirs: Vec<PathBuf> = V1_CONTROLLERS
                    .iter()
                    .filter_map(|c| self.dir(c, name))
                    .collect();
                dirs.dedup();
                dirs
            }
            CgroupVersion::V2 => self.dir("", name).into_iter().collect(),
        };
        for dir in dirs {
            for _ in 0..20 {
                if !dir.exists() || fs::remove_dir(&dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Moves process `pid` into instance `name`'s cgroup in every hierarchy (a command run
    /// inside the instance counts against its limits).
    pub fn join(&self, name: &str, pid: u32) {
        let dirs: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .filter_map(|c| self.dir(c, name))
                .collect(),
            CgroupVersion::V2 => self.dir("", name).into_iter().collect(),
        };
        for dir in dirs.into_iter().filter(|d| d.exists()) {
            let _ = fs::write(dir.join("cgroup.procs"), pid.to_string());
        }
    }

    /// Removes the (empty) cgroup that held this state directory's instances.
    pub fn remove_parent(&self) {
        self.remove("");
    }

    /// True when instance `name` has a cgroup.
    pub fn exists(&self, name: &str) -> bool {
        self.dir("memory", name).is_some_and(|d| d.exists())
    }
}

fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a `key value` per line file (`memory.stat`, `cpu.stat`, ...).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
29 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
";

    const UNIFIED: &str = "\
25 1 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn hybrid_hosts_are_v1_and_unified_ones_v2() {
        let v1 = Cgroups::from_mountinfo(HYBRID, "/phoenix/abc/").unwrap();
        assert_eq!(v1.version(), CgroupVersion::V1);
        assert_eq!(v1.path_of("web-1"), "/phoenix/abc/web-1");
        assert_eq!(
            v1.dir("cpuacct", "web-1").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/phoenix/abc/web-1")
        );
        assert_eq!(
            v1.dir("memory", "web-1").unwrap(),
            Path::new("/sys/fs/cgroup/memory/phoenix/abc/web-1")
        );
        let v2 = Cgroups::from_mountinfo(UNIFIED, "phoenix/abc").unwrap();
        assert_eq!(v2.version(), CgroupVersion::V2);
        assert_eq!(
            v2.dir("memory", "web-1").unwrap(),
            Path::new("/sys/fs/cgroup/phoenix/abc/web-1")
        );
        assert!(Cgroups::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n", "p").is_none());
    }

    #[test]
    fn usage_and_oom_kills_are_read_from_each_version_s_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let make = |path: &str, text: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        make("cpuacct/p/i/cpuacct.usage", "2500000000\n");
        make("memory/p/i/memory.usage_in_bytes", "10485760\n");
        make(
            "memory/p/i/memory.stat",
            "cache 100\ninactive_file 1\ntotal_inactive_file 2097152\n",
        );
        make(
            "memory/p/i/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        make("memory/p/i/cgroup.procs", "12\n13\n");
        let v1 = Cgroups {
            version: CgroupVersion::V1,
            mounts: [
                ("cpuacct".to_string(), root.join("cpuacct")),
                ("memory".to_string(), root.join("memory")),
            ]
            .into(),
            parent: "p".into(),
        };
        let usage = v1.usage("i").unwrap();
        assert_eq!(usage.cpu_seconds, 2.5);
        assert_eq!(usage.rss_bytes, 8 << 20);
        assert_eq!(v1.oom_kills("i"), 2);
        assert_eq!(v1.pids("i"), [12, 13]);
        assert!(v1.usage("gone").is_none());

        make("v2/p/i/cpu.stat", "usage_usec 1500000\nuser_usec 1000000\n");
        make("v2/p/i/memory.current", "4194304\n");
        make("v2/p/i/memory.stat", "anon 1\ninactive_file 1048576\n");
        make(
            "v2/p/i/memory.events",
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        let v2 = Cgroups {
            version: CgroupVersion::V2,
            mounts: [(String::new(), root.join("v2"))].into(),
            parent: "p".into(),
        };
        let usage = v2.usage("i").unwrap();
        assert_eq!(usage.cpu_seconds, 1.5);
        assert_eq!(usage.rss_bytes, 3 << 20);
        assert_eq!(v2.oom_kills("i"), 1);
    }
}
