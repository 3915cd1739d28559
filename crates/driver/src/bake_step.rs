//! The sandbox of a bake's `run` step: this helper is started (as root, in a private mount
//! namespace where the step's overlay root is mounted) in place of the command. It makes the
//! step's namespaces — a user namespace first (root inside maps to an unprivileged range
//! outside, written from here, outside it), then mount, PID, UTS, IPC and network (unless the
//! step asks for the network) owned by it —, and the step's PID 1 moves into the root with
//! `pivot_root` (a `chroot` can be left by a process holding `CAP_SYS_CHROOT`), mounts
//! `/proc`, keeps Docker's default capabilities, sets `no_new_privs`, loads the default seccomp
//! filter and execs the command. Each process dies with its parent (`PR_SET_PDEATHSIG`), so
//! killing the helper (a step's timeout) ends the PID namespace and everything in it.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

/// The first argument that starts the phoenix binary as this helper.
pub const BAKE_STEP_ARG: &str = "__phoenix-bake-step";

/// How many ids the step's user namespace maps (uid and gid 0 to 65,535 inside).
pub const BAKE_STEP_IDS: u32 = 65_536;

/// `phoenix __phoenix-bake-step ROOT WORKDIR ID_OFFSET NETWORK -- ARGV...`: never returns.
/// `ID_OFFSET` is the host uid of the step's root (0: no user namespace); `NETWORK` is `net`
/// (the host's network) or `nonet`.
pub(crate) fn main(args: Vec<OsString>) -> ! {
    let code = match Step::parse(&args).and_then(|step| step.run()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("phoenix bake step: {error}");
            126
        }
    };
    std::process::exit(code)
}

struct Step<'a> {
    root: CString,
    workdir: CString,
    id_offset: u32,
    network: bool,
    argv: &'a [OsString],
}

impl<'a> Step<'a> {
    fn parse(args: &'a [OsString]) -> io::Result<Step<'a>> {
        let usage = || io::Error::other("usage: ROOT WORKDIR ID_OFFSET net|nonet -- ARGV...");
        let [root, workdir, offset, network, separator, argv @ ..] = args else {
            return Err(usage());
        };
        if separator.as_bytes() != b"--" || argv.is_empty() {
            return Err(usage());
        }
        let c = |value: &OsString| {
            CString::new(value.as_bytes())
                .map_err(|_| io::Error::other("a NUL byte in an argument"))
        };
        Ok(Step {
            root: c(root)?,
            workdir: c(workdir)?,
            id_offset: offset
                .to_str()
                .and_then(|o| o.parse().ok())
                .ok_or_else(usage)?,
            network: match network.as_bytes() {
                b"net" => true,
                b"nonet" => false,
                _ => return Err(usage()),
            },
            argv,
        })
    }

    /// Forks the process that enters the namespaces, maps its ids from out here, and waits for
    /// it: the step's exit code (128 + the signal that killed it).
    fn run(&self) -> io::Result<i32> {
        let (ready, mapped) = (pipe()?, pipe()?);
        // SAFETY: this helper was just exec'd and runs one thread; the child only makes
        // system calls before it execs or exits.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(io::Error::last_os_error());
        }
        if child == 0 {
            // Each side keeps only its ends: a dead parent is an end of file, never a hang.
            // SAFETY: closing descriptors this process owns and no longer uses.
            unsafe {
                libc::close(ready.0);
                libc::close(mapped.1);
            }
            let code = match self.enter_namespaces(&ready, &mapped) {
                Ok(never) => match never {},
                Err(error) => {
                    eprintln!("phoenix bake step: {error}");
                    126
                }
            };
            // SAFETY: leaving the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        // SAFETY: as above, on the parent's side.
        unsafe {
            libc::close(ready.1);
            libc::close(mapped.0);
        }
        if self.id_offset > 0 {
            wait_byte(ready.0)?;
            map_ids(child, self.id_offset)?;
            send_byte(mapped.1)?;
        }
        wait_child(child)
    }

    /// In the child: the user namespace (waiting until the parent mapped it), then the others
    /// inside it, then the step's PID 1.
    fn enter_namespaces(&self, ready: &(i32, i32), mapped: &(i32, i32)) -> io::Result<Never> {
        if self.id_offset > 0 {
            // SAFETY: unshare, setgroups, setresgid and setresuid on this process.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWUSER))?;
                send_byte(ready.1)?;
                wait_byte(mapped.0)?;
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(0, 0, 0))?;
                check(libc::setresuid(0, 0, 0))?;
            }
        }
        // After the ids changed: a change of effective ids clears the parent-death signal.
        die_with_parent()?;
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if !self.network {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare and fork in a single-threaded process.
        let pid = unsafe {
            check(libc::unshare(flags))?;
            libc::fork()
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            die_with_parent()?;
            return self.enter_and_exec();
        }
        let code = wait_child(pid)?;
        // SAFETY: leaving the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(code) }
    }

    fn enter_and_exec(&self) -> io::Result<Never> {
        enter_and_exec(&self.root, &self.workdir, self.argv)
    }
}

fn pipe() -> io::Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array it is given.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

fn send_byte(fd: i32) -> io::Result<()> {
    // SAFETY: a one-byte write from a live buffer.
    match unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) } {
        1 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn wait_byte(fd: i32) -> io::Result<()> {
    let mut byte = [0u8];
    // SAFETY: a one-byte read into a live buffer.
    match unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) } {
        1 => Ok(()),
        _ => Err(io::Error::other(
            "the other side of the bake step went away",
        )),
    }
}

/// Writes the child's uid and gid maps: 0..65,536 inside is `offset`.. outside.
fn map_ids(child: libc::pid_t, offset: u32) -> io::Result<()> {
    let line = format!("0 {offset} {BAKE_STEP_IDS}\n");
    for map in ["uid_map", "gid_map"] {
        let path = format!("/proc/{child}/{map}");
        std::fs::write(&path, &line)
            .map_err(|e| io::Error::new(e.kind(), format!("write {path}: {e}")))?;
    }
    Ok(())
}

/// Dies with the parent: a killed helper takes the whole step with it.
fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl and getppid on this process.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        if libc::getppid() == 1 {
            libc::_exit(137);
        }
    }
    Ok(())
}

/// Waits for `pid`: its exit code, or 128 + the signal that killed it.
fn wait_child(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a live status slot.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

enum Never {}

/// In the step's PID 1: make the root `/`, down to Docker's capabilities, seccomp, exec.
fn enter_and_exec(root: &CString, workdir: &CString, argv: &[OsString]) -> io::Result<Never> {
    // Compiled before the root changes: nothing is read from the step's root.
    let programs = crate::seccomp::bpf_programs().map_err(io::Error::other)?;
    let allowed: caps::CapsHashSet = crate::spec::DEFAULT_CAPABILITIES
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect();
    // SAFETY: mount, chdir, pivot_root and umount2 with NUL-terminated strings that outlive
    // the calls, in this process's own mount namespace.
    unsafe {
        // A mount made in this namespace: mounts copied from a more privileged one are locked,
        // and pivot_root refuses to make a locked mount the root.
        check(libc::mount(
            root.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
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
