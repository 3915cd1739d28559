//! The OCI runtime spec (`config.json`) of an instance, as runc lays a container out: the
//! image's root (under a writable layer) as `/`, `/proc`, a `/dev` tmpfs with the standard
//! devices, `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys` read-only, the usual masked and
//! read-only paths of `/proc`; new PID, IPC, UTS, mount and (unless it shares the host's)
//! network namespaces; a user namespace mapping its uids to an unprivileged host range
//! (unless the role allows real root); Docker's default capabilities, `no_new_privs`, seccomp;
//! cgroup limits; secrets on a tmpfs at `/run/secrets`.

use std::path::Path;

use serde_json::{Value, json};

use crate::user::User;
use crate::{InstanceSpec, Network};

/// Docker's default capabilities.
pub(crate) const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// How many uids (and gids) an instance's user namespace maps: 0..65536 inside.
pub(crate) const ID_RANGE: u32 = 65536;

/// The CFS period CPU limits are expressed in (µs).
const CPU_PERIOD: u64 = 100_000;

/// Where the secrets tmpfs is mounted inside an instance.
pub(crate) const SECRETS_DIR: &str = "/run/secrets";

/// What the spec needs besides the instance's own description.
pub(crate) struct Layout<'a> {
    /// The root as the runtime mounts it (the overlay of the image root and a writable layer).
    pub rootfs: &'a Path,
    /// The bundle directory: `hosts` and `hostname` files are bound from it.
    pub bundle: &'a Path,
    pub user: &'a User,
    pub cgroups_path: String,
    /// The host uid of uid 0 inside, when the instance has a user namespace.
    pub id_offset: Option<u32>,
    /// The seccomp profile for the runtime to apply (runc); `None` when the caller applies it.
    pub seccomp: Option<Value>,
    /// The environment, `PORT` and `HOST` included.
    pub env: &'a [(String, String)],
}

/// The whole `config.json`.
pub(crate) fn runtime_spec(instance: &InstanceSpec, layout: &Layout) -> Value {
    let own_network = matches!(instance.network, Network::Bridge(_));
    let user = layout.user;
    let root_inside = user.uid == 0;
    let capabilities: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    // As Docker does: the capabilities work for root; another user gets them only as a bound.
    let active: Vec<&str> = if root_inside {
        capabilities.clone()
    } else {
        Vec::new()
    };
    let mut env: Vec<String> = layout.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !layout.env.iter().any(|(k, _)| k == "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if own_network {
        namespaces.push(json!({"type": "network"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": layout.cgroups_path,
        "resources": resources(instance),
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware", "/sys/devices/virtual/powercap"
        ],
        "readonlyPaths": [
            "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
        ],
    });
    if let Some(offset) = layout.id_offset {
        linux["namespaces"]
            .as_array_mut()
            .expect("an array")
            .push(json!({"type": "user"}));
        let mapping = json!([{"containerID": 0, "hostID": offset, "size": ID_RANGE}]);
        linux["uidMappings"] = mapping.clone();
        linux["gidMappings"] = mapping;
    }
    if own_network {
        // As Docker does: any user may bind low ports in the instance's own network.
        linux["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0"});
    }
    if let Some(profile) = &layout.seccomp {
        linux["seccomp"] = profile.clone();
    }
    let nofile = instance.resources.nofile.unwrap_or(1024);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": layout.rootfs, "readonly": false},
        "hostname": instance.name,
        "process": {
            "terminal": false,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.groups},
            "args": instance.argv,
            "env": env,
            "cwd": if instance.workdir.is_empty() { "/" } else { instance.workdir.as_str() },
            "capabilities": {
                "bounding": capabilities,
                "effective": active,
                "permitted": active,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": true,
        },
        "mounts": mounts(instance, layout),
        "linux": linux,
    })
}

fn resources(instance: &InstanceSpec) -> Value {
    let limits = &instance.resources;
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(memory) = limits.memory {
        // No swap beyond the limit: over it, the instance is OOM-killed.
        resources["memory"] = json!({"limit": memory, "swap": memory});
    }
    if let Some(cpus) = limits.cpus {
        let quota = ((cpus * CPU_PERIOD as f64).round() as i64).max(1000);
        resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD});
    }
    if let Some(pids) = limits.pids {
        resources["pids"] = json!({"limit": pids});
    }
    resources
}

fn mounts(instance: &InstanceSpec, layout: &Layout) -> Vec<Value> {
    let own_network = matches!(instance.network, Network::Bridge(_));
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    if own_network || layout.id_offset.is_none() {
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                           "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
    } else {
        // A user namespace may mount sysfs only in a network namespace it owns.
        mounts.push(
            json!({"destination": "/sys", "type": "bind", "source": "/sys",
                           "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
        );
    }
    for file in ["hosts", "hostname"] {
        mounts.push(json!({"destination": format!("/etc/{file}"), "type": "bind",
            "source": layout.bundle.join(file), "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    if !own_network && Path::new("/etc/resolv.conf").exists() {
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind",
            "source": "/etc/resolv.conf", "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    if !instance.secrets.is_empty() {
        let user = layout.user;
        mounts.push(
            json!({"destination": SECRETS_DIR, "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "noexec", "mode=0700", "size=1m",
                        format!("uid={}", user.uid), format!("gid={}", user.gid)]}),
        );
    }
    mounts
}

/// The `/etc/hosts` of an instance: itself, localhost, and the roles it may call.
pub(crate) fn hosts_file(instance: &InstanceSpec, own_addr: Option<std::net::Ipv4Addr>) -> String {
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let own = own_addr.map_or("127.0.1.1".to_string(), |a| a.to_string());
    text.push_str(&format!("{own}\t{}\n", instance.name));
    for (name, addr) in &instance.hosts {
        text.push_str(&format!("{addr}\t{name}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resources;

    fn instance() -> InstanceSpec {
        InstanceSpec {
            name: "web-1a2b3c".into(),
            role: "web".into(),
            root: "/state/images/roots/x".into(),
            argv: vec!["/bin/hello".into()],
            env: vec![],
            workdir: String::new(),
            user: String::new(),
            log_path: "/state/logs/web-1a2b3c.log".into(),
            output: None,
            network: Network::Host,
            port: Some(8080),
            host_ip: std::net::Ipv4Addr::LOCALHOST,
            resources: Resources {
                cpus: Some(0.5),
                memory: Some(256 << 20),
                pids: Some(512),
                nofile: Some(4096),
            },
            secrets: vec![crate::Secret {
                name: "db".into(),
                value: b"hunter2".to_vec(),
            }],
            allow_root: false,
            hosts: vec![("api".into(), std::net::Ipv4Addr::new(10, 89, 0, 1))],
        }
    }

    #[test]
    fn the_spec_isolates_limits_and_parses_as_an_oci_runtime_spec() {
        let user = User {
            uid: 33,
            gid: 33,
            groups: vec![],
        };
        let env = [("PORT".to_string(), "8080".to_string())];
        let layout = Layout {
            rootfs: Path::new("/state/run/web-1a2b3c/rootfs"),
            bundle: Path::new("/state/run/web-1a2b3c"),
            user: &user,
            cgroups_path: "/phoenix/abc/web-1a2b3c".into(),
            id_offset: Some(1_000_000),
            seccomp: Some(crate::seccomp::oci_profile()),
            env: &env,
        };
        let spec = runtime_spec(&instance(), &layout);
        let parsed: libcontainer::oci_spec::runtime::Spec =
            serde_json::from_value(spec.clone()).unwrap();
        let linux = parsed.linux().as_ref().unwrap();
        let kinds: Vec<String> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        assert_eq!(kinds, ["Pid", "Ipc", "Uts", "Mount", "User"]);
        assert_eq!(spec["linux"]["uidMappings"][0]["hostID"], 1_000_000);
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(spec["linux"]["resources"]["pids"]["limit"], 512);
        assert_eq!(spec["process"]["rlimits"][0]["hard"], 4096);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        // A user other than root keeps no capability but as a bound.
        assert_eq!(spec["process"]["capabilities"]["effective"], json!([]));
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(spec["hostname"], "web-1a2b3c");
        // No env line carries the secret; it goes to a tmpfs owned by the user.
        assert!(!spec.to_string().contains("hunter2"));
        let secrets = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == SECRETS_DIR)
            .unwrap();
        assert!(secrets["options"].to_string().contains("uid=33"));
        // Sharing the host's network from a user namespace: /sys is bound, not mounted.
        let sys = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert_eq!(sys["type"], "bind");
        assert_eq!(parsed.process().as_ref().unwrap().cwd(), Path::new("/"));
    }

    #[test]
    fn hosts_files_name_the_instance_and_the_roles() {
        let text = hosts_file(&instance(), Some(std::net::Ipv4Addr::new(10, 89, 0, 7)));
        assert!(text.contains("10.89.0.7\tweb-1a2b3c\n"));
        assert!(text.contains("10.89.0.1\tapi\n"));
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
    }
}
