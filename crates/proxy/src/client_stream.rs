//! Client sockets registered with tokio's reactor only once they would block.
//!
//! A connection that opens, sends one request and closes (`Connection: close`, a health
//! checker, a script) usually has its request waiting by the time it is accepted, and its
//! small answer fits the socket's send buffer. Registering such a socket with epoll and
//! deregistering it again costs two `epoll_ctl` calls that do nothing for it. HAProxy tries
//! the read and the write first and subscribes only on "would block"; so does this.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A client connection: a plain non-blocking socket until an operation would block, a
/// registered tokio stream from then on.
#[derive(Debug)]
pub(crate) enum ClientStream {
    Unregistered(std::net::TcpStream),
    Registered(TcpStream),
    /// Only while switching from one to the other (registration failed if left here).
    Gone,
}

impl ClientStream {
    /// The registered stream, registering the socket now if it is not yet.
    pub(crate) fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let ClientStream::Unregistered(_) = self {
            let ClientStream::Unregistered(plain) = std::mem::replace(self, ClientStream::Gone)
            else {
                unreachable!("checked just above");
            };
            *self = ClientStream::Registered(TcpStream::from_std(plain)?);
        }
        match self {
            ClientStream::Registered(stream) => Ok(stream),
            _ => Err(io::Error::other(
                "the client socket could not be registered",
            )),
        }
    }

    /// The registered stream, for the paths that only work on one (TCP tunnels).
    pub(crate) fn into_tokio(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        match self {
            ClientStream::Registered(stream) => Ok(stream),
            _ => Err(io::Error::other(
                "the client socket could not be registered",
            )),
        }
    }

    /// The plain socket, deregistered (for handing it to another program).
    pub(crate) fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            ClientStream::Unregistered(plain) => Ok(plain),
            ClientStream::Registered(stream) => stream.into_std(),
            ClientStream::Gone => Err(io::Error::other("the client socket is gone")),
        }
    }

    /// Runs `operation` on the plain socket while it is unregistered; on "would block",
    /// registers it and returns `None` so the caller polls the registered stream instead.
    fn attempt<T>(
        &mut self,
        operation: impl FnOnce(&mut std::net::TcpStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let ClientStream::Unregistered(plain) = self else {
            return None;
        };
        match operation(plain) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.registered().err().map(Err)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => None,
            done => Some(done),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let attempted = this.attempt(|plain| {
            // Straight into the unfilled part, as tokio's own streams read: going through
            // `initialize_unfilled` zeroed the whole 8 KiB first on every read (1 % of the
            // proxy's time on a new connection per request, `perf`).
            // SAFETY: `recv` only writes into the slice; nothing is de-initialized.
            let n = socket2::SockRef::from(&*plain).recv(unsafe { buf.unfilled_mut() })?;
            // SAFETY: `recv` filled the first `n` bytes of the unfilled part.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            Ok(())
        });
        if let Some(done) = attempted {
            return Poll::Ready(done);
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(done) = this.attempt(|plain| plain.write(buf)) {
            return Poll::Ready(done);
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP socket holds nothing back in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Unregistered(plain) => {
                Poll::Ready(plain.shutdown(std::net::Shutdown::Write))
            }
            ClientStream::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(io::Error::other("the client socket is gone"))),
        }
    }
}

/// A listening socket whose connections are accepted without registering them.
pub(crate) struct Listener(AsyncFd<std::net::TcpListener>);

/// Who speaks first on a listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstWord {
    /// HTTP and TLS: the client sends before it expects anything.
    Client,
    /// Layer 4 (`mode = "tcp"`): SMTP, SSH or MySQL servers greet first.
    Either,
}

/// How long the kernel holds a connection that has sent nothing before handing it over anyway.
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

/// Connections the kernel may hold for a listener before it is ready to take them (capped by
/// `net.core.somaxconn`, 4,096 by default). tokio, like the standard library, listens with
/// 128, and a deferred connection waits among the half-open ones, which the backlog bounds
/// too: 2,000 clients connecting at once (`bench/proxy` `2000-conns`) overflowed it, and wrk
/// counted 419–742 requests timed out in each round. HAProxy's backlog is its `maxconn`.
pub(crate) const BACKLOG: i32 = 4096;

/// Sets the options every listener the proxy serves gets:
/// - a backlog of [`BACKLOG`] (listening again only changes it);
/// - TCP_NODELAY: Linux copies it to every socket accepted from it, which saves a
///   `setsockopt` per connection;
/// - TCP_DEFER_ACCEPT where the client speaks first: the kernel completes the handshake but
///   hands a connection over only once its first bytes arrive. A new connection then costs
///   the proxy one wake-up, with its request ready to read, instead of one for the
///   connection and another for the request; on `bench/proxy` `new-conn` that took the
///   proxy's CPU time a request from 42 to 32 µs. nginx's `listen … deferred` and HAProxy's
///   `defer-accept` set the same option. A client that sends nothing is handed over after
///   about a second, and until then holds no descriptor here. Not where a server may speak
///   first: its clients would wait that second for their greeting.
pub(crate) fn tune_listener(listener: &impl AsFd, first: FirstWord) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.listen(BACKLOG)?;
    socket.set_tcp_nodelay(true)?;
    if first == FirstWord::Either {
        return Ok(());
    }
    // SAFETY: a descriptor borrowed for the call, and a pointer to a c_int with its size.
    let set = unsafe {
        libc::setsockopt(
            listener.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&DEFER_ACCEPT_SECONDS as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Listener {
    /// Tunes the listening socket first (see [`tune_listener`]).
    pub(crate) fn new(listener: TcpListener, first: FirstWord) -> io::Result<Listener> {
        let plain = listener.into_std()?;
        tune_listener(&plain, first)?;
        // SAFETY: the std listener owns its descriptor, and nothing replaces or closes it
        // while the AsyncFd holds it (`into_std` takes it back out).
        let registered = unsafe { AsyncFd::register_with_interest(plain, Interest::READABLE) };
        Ok(Listener(registered.map_err(io::Error::from)?))
    }

    /// Accepts the next connection: a non-blocking socket, close-on-exec, unregistered.
    pub(crate) async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        let (plain, client) = self
            .0
            .async_io(Interest::READABLE, |listener| accept4(listener.as_raw_fd()))
            .await?;
        Ok((ClientStream::Unregistered(plain), client))
    }

    /// The plain listening socket, deregistered (for handing it to another program).
    pub(crate) fn into_std(self) -> std::net::TcpListener {
        self.0.into_inner()
    }
}

fn accept4(listener: i32) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let mut address = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut length = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `address` is a zeroed sockaddr_storage and `length` its size, as accept4 needs.
    let fd = unsafe {
        libc::accept4(
            listener,
            address.as_mut_ptr().cast(),
            &mut length,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    // SAFETY: accept4 filled in at most `length` bytes of the zeroed storage.
    let address = unsafe { address.assume_init() };
    Ok((stream, socket_address(&address)?))
}

/// The peer address accept4 wrote (IPv4 or IPv6: a TCP listener gives no other family).
fn socket_address(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it can hold.
            let v4 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Ok(SocketAddrV4::new(ip, u16::from_be(v4.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it can hold.
            let v6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            let port = u16::from_be(v6.sin6_port);
            Ok(SocketAddrV6::new(ip, port, v6.sin6_flowinfo, v6.sin6_scope_id).into())
        }
        family => Err(io::Error::other(format!(
            "accept gave an address of family {family}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and its accepted socket. The client sends `first` at once: the listener hands a
    /// connection over only once bytes arrive (TCP_DEFER_ACCEPT).
    async fn pair(at: &str, first: &[u8]) -> (std::net::TcpStream, ClientStream, SocketAddr) {
        let listener =
            Listener::new(TcpListener::bind(at).await.unwrap(), FirstWord::Client).unwrap();
        let address = listener.0.get_ref().local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(address).unwrap();
        client.write_all(first).unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(
            peer,
            client.local_addr().unwrap(),
            "the peer address accept4 gave"
        );
        (client, accepted, peer)
    }

    #[tokio::test]
    async fn a_connection_is_handed_over_once_its_first_bytes_arrive() {
        let bound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = Listener::new(bound, FirstWord::Client).unwrap();
        let address = listener.0.get_ref().local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(address).unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(early.is_err(), "accepted before the client sent anything");
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let (mut accepted, peer) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("accepted once the request came")
            .unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let mut request = [0u8; 64];
        let n = accepted.read(&mut request).await.unwrap();
        assert_eq!(
            &request[..n],
            b"GET / HTTP/1.1\r\n",
            "already there to read"
        );
        assert!(!is_registered(&accepted), "read without waiting on epoll");
    }

    #[tokio::test]
    async fn where_a_server_may_speak_first_a_silent_connection_is_handed_over_at_once() {
        let bound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = Listener::new(bound, FirstWord::Either).unwrap();
        let address = listener.0.get_ref().local_addr().unwrap();
        let client = std::net::TcpStream::connect(address).unwrap();
        // Well inside the second a deferred accept would hold it.
        let (_, peer) = tokio::time::timeout(Duration::from_millis(500), listener.accept())
            .await
            .expect("handed over before the client sent anything")
            .unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_from_the_listener() {
        let (_client, accepted, _) = pair("127.0.0.1:0", b"x").await;
        let ClientStream::Unregistered(plain) = &accepted else {
            panic!("registered at accept")
        };
        assert!(plain.nodelay().unwrap(), "TCP_NODELAY copied at accept");
        let (_client, accepted, _) = pair("[::1]:0", b"x").await;
        let ClientStream::Unregistered(plain) = &accepted else {
            panic!("registered at accept")
        };
        assert!(
            plain.nodelay().unwrap(),
            "TCP_NODELAY copied at accept (IPv6)"
        );
    }

    fn is_registered(stream: &ClientStream) -> bool {
        matches!(stream, ClientStream::Registered(_))
    }

    #[tokio::test]
    async fn a_request_already_sent_is_served_without_registering_the_socket() {
        let (mut client, mut accepted, _) = pair("127.0.0.1:0", b"GET / HTTP/1.1\r\n\r\n").await;
        // The bytes are on loopback once write returns; wait until the socket says so.
        let mut peek = [0u8; 1];
        let ClientStream::Unregistered(plain) = &accepted else {
            panic!("registered at accept")
        };
        plain.set_nonblocking(false).unwrap();
        plain.peek(&mut peek).unwrap();
        plain.set_nonblocking(true).unwrap();

        let mut request = [0u8; 64];
        let n = accepted.read(&mut request).await.unwrap();
        assert_eq!(&request[..n], b"GET / HTTP/1.1\r\n\r\n");
        accepted
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        accepted.shutdown().await.unwrap();
        assert!(
            !is_registered(&accepted),
            "nothing would block, so no registration"
        );

        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!(
            answer, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "answer, then FIN"
        );
    }

    #[tokio::test]
    async fn reads_into_spare_capacity_append_exactly_what_arrived() {
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (client, mut accepted, _) = pair("127.0.0.1:0", &sent).await;
        drop(client);
        let mut got = bytes::BytesMut::with_capacity(16);
        got.extend_from_slice(b"kept");
        loop {
            got.reserve(8192);
            if accepted.read_buf(&mut got).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(&got[..4], b"kept", "bytes already held stay");
        assert!(got[4..] == sent[..], "then every byte sent, in order");
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_the_socket_and_then_waits_for_data() {
        let (mut client, mut accepted, _) = pair("[::1]:0", b"early").await;
        let mut request = [0u8; 64];
        let n = accepted.read(&mut request).await.unwrap();
        assert_eq!(&request[..n], b"early");
        assert!(!is_registered(&accepted), "that read did not block");
        let read = accepted.read(&mut request);
        tokio::pin!(read);
        assert!(
            futures_poll_once(read.as_mut()).await.is_none(),
            "nothing more sent yet"
        );
        client.write_all(b"late").unwrap();
        let n = read.await.unwrap();
        assert_eq!(&request[..n], b"late");
        assert!(is_registered(&accepted));
        let plain = accepted.into_std().unwrap();
        assert_eq!(plain.peer_addr().unwrap(), client.local_addr().unwrap());
    }

    /// Polls `future` once: its output, or `None` while it is pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut future).poll(cx) {
                Poll::Ready(output) => Some(output),
                Poll::Pending => None,
            })
        })
        .await
    }
}
