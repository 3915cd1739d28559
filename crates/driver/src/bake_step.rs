//! The sandbox of a bake's `run` step. util-linux's `unshare` makes the step's namespaces
//! (mount, PID, UTS, IPC, and network unless the step asks for it) and execs this helper in
//! place of the command; the helper moves into the step's root with `pivot_root` (a `chroot`
//! can be left by a process holding `CAP_SYS_CHROOT`), mounts `/proc`, keeps Docker's default
//! capabilities, sets `no_new_privs`, loads the default seccomp filter, and execs the command
//! as PID 1 of its namespace.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// The first argument that starts the phoenix binary as this helper.
pub const BAKE_STEP_ARG: &str = "__phoenix-bake-step";

/// `phoenix __phoenix-bake-step ROOT WORKDIR -- ARGV...`: never returns.
pub(crate) fn main(args: Vec<OsString>) -> ! {
    let error = match enter_and_exec(&args) {
        Ok(never) => match never {},
        Err(error) => error,
    };
    eprintln!("phoenix bake step: {error}");
    std::process::exit(126)
}

enum Never {}

fn enter_and_exec(args: &[OsString]) -> io::Result<Never> {
    let [root, workdir, separator, argv @ ..] = args else {
        return Err(io::Error::other("usage: ROOT WORKDIR -- ARGV..."));
    };
    if separator.as_bytes() != b"--" || argv.is_empty() {
        return Err(io::Error::other("usage: ROOT WORKDIR -- ARGV..."));
    }
    let c = |value: &OsString| {
        CString::new(value.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"))
    };
    let (root, workdir) = (c(root)?, c(workdir)?);
    // Compiled before the root changes: nothing is read from the step's root.
    let programs = crate::seccomp::bpf_programs().map_err(io::Error::other)?;
    let allowed: caps::CapsHashSet = crate::spec::DEFAULT_CAPABILITIES
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect();
    // SAFETY: mount, chdir, pivot_root and umount2 with NUL-terminated strings that outlive
    // the calls, in this process's own mount namespace.
    unsafe {
        check(libc::chdir(root.as_ptr()))?;
        check(libc::mount(
            c"proc".as_ptr(),
            c"proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ))?;
        // runc's way: the old root is stacked under the new one and detached, no directory
        // left behind in the layer.
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::chdir(workdir.as_ptr()))?;
    }
    crate::exec::limit_capabilities(&allowed)?;
    // SAFETY: prctl on this process.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let env: Vec<String> = std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    let program = CString::new(crate::exec::find_program(&argv[0], &env))
        .map_err(|_| io::Error::other("a NUL byte in the command"))?;
    let (c_argv, c_env) = (
        crate::exec::c_strings(&argv)?,
        crate::exec::c_strings(&env)?,
    );
    for filter in &programs {
        seccompiler::apply_filter(filter).map_err(|e| io::Error::other(e.to_string()))?;
    }
    let argv_ptrs = crate::exec::null_terminated(&c_argv);
    let env_ptrs = crate::exec::null_terminated(&c_env);
    // SAFETY: execve with NUL-terminated arrays of pointers to live C strings.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
    let error = io::Error::last_os_error();
    Err(io::Error::new(
        error.kind(),
        format!("{}: {error}", argv[0]),
    ))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
