//! A command inside a running container of the isolating driver, as runc's `exec` does it:
//! join its namespaces (its user namespace first: libcontainer's tenant processes do not) and
//! its cgroup, take its user, its capabilities (Docker's set at most), `no_new_privs`, its
//! seccomp filter, its environment and working directory, then exec. In a forked child: the
//! parent waits and passes the exit code on.

use std::ffi::CString;
use std::io;
use std::path::Path;

use serde_json::Value;

use crate::cgroup::Cgroups;

/// Runs `argv` inside the container whose spec is `config` and whose init is `pid`; returns
/// only on failure (the child execs, the parent exits with its code).
pub(crate) fn exec_inside(
    config: &Value,
    pid: u32,
    cgroups: Option<(Cgroups, String)>,
    argv: &[String],
) -> io::Result<()> {
    let process = &config["process"];
    let env: Vec<String> = process["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let program = argv.first().cloned().unwrap_or_default();
    if program.is_empty() {
        return Err(io::Error::other("no command given"));
    }
    let programs = crate::seccomp::bpf_programs().map_err(io::Error::other)?;
    let user = &process["user"];
    let id = |key: &str| user[key].as_u64().unwrap_or(0) as u32;
    let (uid, gid) = (id("uid"), id("gid"));
    let groups: Vec<libc::gid_t> = user["additionalGids"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect()
        })
        .unwrap_or_default();
    let cwd = process["cwd"].as_str().unwrap_or("/").to_string();
    let capabilities = capability_set(&process["capabilities"]["bounding"]);
    let c_argv = c_strings(argv)?;
    let c_env = c_strings(&env)?;
    let c_cwd = CString::new(cwd).map_err(|_| io::Error::other("NUL in the working directory"))?;

    // Its cgroup first, while the host's cgroup file system is in sight: the command counts
    // against the instance's limits.
    if let Some((cgroups, name)) = cgroups {
        cgroups.join(&name, std::process::id());
    }
    crate::enter::enter(pid)?;
    // Now in the forked child, inside every namespace of the instance.
    // While still root of the user namespace (dropping from the bounding set needs it); a
    // user other than root then loses the rest with its setuid.
    limit_capabilities(&capabilities)?;
    // SAFETY: credential and prctl calls on this single-threaded process.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl, chdir and execve with pointers that outlive the calls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::chdir(c_cwd.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Looked up now, in the instance's root.
    let c_program = CString::new(find_program(&program, &env))
        .map_err(|_| io::Error::other("NUL in the command"))?;
    for filter in &programs {
        seccompiler::apply_filter(filter).map_err(|e| io::Error::other(e.to_string()))?;
    }
    let argv_ptrs = null_terminated(&c_argv);
    let env_ptrs = null_terminated(&c_env);
    // SAFETY: execve with NUL-terminated arrays of pointers to live C strings.
    unsafe { libc::execve(c_program.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
    let error = io::Error::last_os_error();
    eprintln!("phoenix exec: {}: {error}", argv[0]);
    std::process::exit(127)
}

/// The capabilities of the spec's bounding set (Docker's default set).
fn capability_set(names: &Value) -> caps::CapsHashSet {
    names
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|n| n.as_str()?.parse::<caps::Capability>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Drops every capability outside `allowed` from the bounding set; keeps at most `allowed` in
/// effect (a non-root user has none left after its `setuid` anyway).
pub(crate) fn limit_capabilities(allowed: &caps::CapsHashSet) -> io::Result<()> {
    let fail = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    for capability in caps::all() {
        if !allowed.contains(&capability) {
            caps::drop(None, caps::CapSet::Bounding, capability).map_err(fail)?;
        }
    }
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        let now = caps::read(None, set).map_err(fail)?;
        let kept: caps::CapsHashSet = now.intersection(allowed).copied().collect();
        caps::set(None, set, &kept).map_err(fail)?;
    }
    caps::clear(None, caps::CapSet::Ambient).map_err(fail)
}

/// `program` as a path: as given when it holds a `/`, else the first match on the instance's
/// `PATH` (its root is this process's root by then).
pub(crate) fn find_program(program: &str, env: &[String]) -> String {
    if program.contains('/') {
        return program.to_string();
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .find(|candidate| Path::new(candidate).is_file())
        .unwrap_or_else(|| program.to_string())
}

pub(crate) fn c_strings(values: &[String]) -> io::Result<Vec<CString>> {
    values
        .iter()
        .map(|v| {
            CString::new(v.as_str()).map_err(|_| io::Error::other("a NUL byte in an argument"))
        })
        .collect()
}

pub(crate) fn null_terminated(values: &[CString]) -> Vec<*const libc::c_char> {
    values
        .iter()
        .map(|v| v.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}
