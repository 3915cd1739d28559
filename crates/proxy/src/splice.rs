//! Zero-copy relay of large response bodies: splice(2) moves the bytes from the backend's
//! socket into a pipe and from the pipe into the client's socket, so they never cross into
//! user space (HAProxy does the same for large bodies). Only bodies of a known length take
//! this path; chunked ones need their framing read and stay on the copying path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bodies with at least this much left to read are spliced; shorter ones are cheaper to copy
/// than the extra system calls.
pub(crate) const MIN_BODY: u64 = 16 * 1024;
/// Most bytes moved by one splice from the socket (a pipe holds 64 KiB by default).
const STEP: usize = 64 * 1024;

/// A pipe kept per client connection and reused from response to response while empty.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds` on success; nothing else owns them.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created by pipe2 and are owned only here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// Why a spliced body did not get through. The pipe may hold bytes: it is not to be reused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Broken {
    #[error("the backend closed or failed before the whole body arrived")]
    Backend(#[source] io::Error),
    #[error("the client's connection failed")]
    Client(#[source] io::Error),
}

/// Moves exactly `len` bytes from `from` to `to` through `pipe`, calling `sent` with each
/// count delivered to the client.
pub(crate) async fn relay(
    pipe: &Pipe,
    from: &TcpStream,
    to: &TcpStream,
    mut len: u64,
    mut sent: impl FnMut(usize),
) -> Result<(), Broken> {
    while len > 0 {
        let want = len.min(STEP as u64) as usize;
        let filled = fill(pipe, from, want).await.map_err(Broken::Backend)?;
        len -= filled as u64;
        drain(pipe, to, filled).await.map_err(Broken::Client)?;
        sent(filled);
    }
    Ok(())
}

/// Splices up to `want` bytes from the socket into the (empty) pipe.
async fn fill(pipe: &Pipe, from: &TcpStream, want: usize) -> io::Result<usize> {
    loop {
        from.readable().await?;
        // The pipe is empty, so "would block" can only mean the socket has nothing to read.
        match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), want)
        }) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(moved) => return Ok(moved),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Splices `held` bytes from the pipe into the socket.
async fn drain(pipe: &Pipe, to: &TcpStream, mut held: usize) -> io::Result<()> {
    while held > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), to.as_raw_fd(), held)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(moved) => held -= moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from live
    // sockets and the pipe); null offsets are required for sockets and pipes.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}
