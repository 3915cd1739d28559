//! `flood`: writes numbered lines as fast as it can, for bench/logs.
//!
//! `flood N [--syslog SOCKET]` writes `flood start`, then N lines of about 100 bytes, then
//! `flood end N lines in MS ms (R lines/s)`, each line a write of its own as an application's
//! line-buffered stdout does; with `--syslog`, each line is a datagram to that Unix socket (RFC
//! 3164-style, as syslog(3) sends). When `PORT` is set it listens there (for a TCP health
//! check) and stays up after writing; otherwise it exits.

use std::io::Write;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u64 = match args.first().and_then(|n| n.parse().ok()) {
        Some(count) => count,
        None => {
            eprintln!("usage: flood N [--syslog SOCKET]");
            std::process::exit(2);
        }
    };
    let syslog = match args.get(1).map(String::as_str) {
        Some("--syslog") => Some(args.get(2).expect("--syslog SOCKET").clone()),
        Some(other) => {
            eprintln!("flood: unknown argument {other:?}");
            std::process::exit(2);
        }
        None => None,
    };
    let listener = std::env::var("PORT").ok().map(|port| {
        std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("PORT")))
            .expect("listen on PORT")
    });
    let name = std::env::var("PHOENIX_INSTANCE").unwrap_or_else(|_| std::process::id().to_string());
    let padding = "x".repeat(40);
    let mut send: Box<dyn FnMut(&str)> = match &syslog {
        Some(path) => {
            let socket = std::os::unix::net::UnixDatagram::unbound().expect("a socket");
            socket.connect(path).expect("connect to the syslog socket");
            Box::new(move |line: &str| {
                let message = format!("<14>flood[1]: {line}");
                socket.send(message.as_bytes()).expect("send to syslog");
            })
        }
        None => {
            let stdout = std::io::stdout();
            Box::new(move |line: &str| {
                let mut out = stdout.lock();
                out.write_all(line.as_bytes()).expect("write");
                out.write_all(b"\n").expect("write");
                out.flush().expect("write");
            })
        }
    };
    send("flood start");
    let started = Instant::now();
    for n in 1..=count {
        send(&format!("{name} line {n} {padding}"));
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let rate = count as f64 / (ms / 1000.0);
    send(&format!(
        "flood end {count} lines in {ms:.0} ms ({rate:.0} lines/s)"
    ));
    eprintln!("flood end {count} lines in {ms:.0} ms ({rate:.0} lines/s)");
    if let Some(listener) = listener {
        // Stay up (accepting health checks) until stopped.
        for stream in listener.incoming() {
            drop(stream);
        }
    }
}
