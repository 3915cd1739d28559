//! The proxy at the edge of its descriptors: when `accept` fails for lack of them it pauses
//! instead of spinning, and serves again once connections go.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{addr_in_log, phoenix_bin};

/// User plus system CPU time of `pid`, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_the_proxy_pauses_instead_of_spinning_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.log");
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = Command::new(phoenix_bin());
    command
        .args(["proxy", "--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--backend", &refusing.to_string()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("proxy.err")).unwrap())
        .stdin(Stdio::null());
    // SAFETY: setrlimit in the child before exec; no allocation.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let addr = addr_in_log(&log, "phoenix proxy: http://");
    // More connections than descriptors: the kernel completes them, the proxy cannot accept.
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(held.len() >= 60, "{} connections", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(child.id()) - before;
    // A loop retrying `accept` burns the whole 2 s (200 ticks at 100 Hz); pausing, almost none.
    assert!(
        spent < 50,
        "{spent} ticks of CPU in 2 s while out of descriptors"
    );
    let errors = std::fs::read_to_string(dir.path().join("proxy.err")).unwrap();
    assert!(errors.contains("accept failed; pausing"), "{errors}");

    drop(held);
    common::wait_for("served again", Duration::from_secs(15), || {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        // The backend refuses: the proxy's own answer proves it accepted and served.
        answer.starts_with("HTTP/1.1 502")
    });
    let _ = child.kill();
    let _ = child.wait();
}
