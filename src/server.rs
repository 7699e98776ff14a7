//! Listeners, the accept loop, per-connection limits and graceful drain.
//!
//! * A connection permit (`max_connections` per listener) is taken *before*
//!   `accept`, so over the cap new connections wait in the kernel backlog
//!   instead of being accepted and dropped; accept errors (EMFILE, ENFILE,
//!   ECONNABORTED) back off from 5 ms up to 1 s instead of spinning.
//! * The PROXY header (trusted peers, when enabled) and the TLS handshake run
//!   inside the connection's task, both under `handshake_timeout`.
//! * HTTP/1.1 and HTTP/2 share a socket: the first bytes tell the h2
//!   preface from an HTTP/1.1 request (behind TLS too). hyper's header timer
//!   is on (`header_timeout`), heads are capped at `max_header_bytes`.
//! * HTTP/1.1 keep-alive: hyper serves a connection while requests come and
//!   is dropped when the connection idles, keeping only the socket (see
//!   [`crate::keepalive`]): ~4 KiB per idle connection instead of ~28.
//! * An idle watchdog closes a connection with no request in flight for
//!   `idle_timeout` (HTTP/1.1: closed; HTTP/2: GOAWAY), and drops one whose
//!   writes to the client made no progress for `send_timeout` (a client that
//!   stopped reading would otherwise hold its response forever). That drop
//!   is a reset (`SO_LINGER` 0): a plain close would leave the kernel an
//!   orphaned socket holding the unsent bytes and probing a zero window for
//!   minutes (nginx's `reset_timedout_connection`, HAProxy's `nolinger`),
//!   and a client of a close-delimited body would take the early EOF for
//!   the end of a complete response.
//! * Shutdown: the token stops every accept loop (new connections are
//!   refused once the listening socket closes), every connection is asked to
//!   finish gracefully (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2),
//!   and [`Server::shutdown`] waits for them up to the drain deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::os::fd::AsFd;

use crate::body::RespBody;
use crate::config::{Config, ListenerConfig};
use crate::conns::{ConnSet, Member};
use crate::h1server::{self, Written};
use crate::keepalive::{self, IdleProbe, Rewind, Sniffed, WaitReadable, Watched};
use crate::metrics::Metrics;
use crate::proxy::{self, ConnCtx, ListenerCtx};
use crate::table::Table;
use crate::tls::SniResolver;
use crate::upgrade::Inherited;

/// How long a connection that has not sent a request yet may take to send
/// it once a drain has begun.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How long an HTTP/1.1 connection stays with hyper after going idle before
/// its buffers are released (see [`crate::keepalive`]). A client that sends
/// its next request sooner (any keep-alive client under load) is served on
/// the same hyper connection: rebuilding one per request cost ~5.7k
/// instructions, +14 % per proxied request (callgrind). Longer lingers keep
/// more buffers alive at once, and glibc keeps the pages: idle-connection
/// memory measured 3.3 KiB with no linger, 4.0 at 10 ms, 6.1 at 50 ms.
const RELEASE_LINGER: Duration = Duration::from_millis(10);

/// Per-connection activity, read by the idle watchdog. Atomics only: the
/// request path never locks.
#[derive(Debug)]
pub struct ConnActivity {
    epoch: Instant,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last request start or end.
    last_ms: AtomicU64,
    /// What the HTTP/1.1 keep-alive release watches.
    pub probe: Arc<IdleProbe>,
    /// 1 + milliseconds since `epoch` when a write to the client first found
    /// its socket full; 0 while writes make progress.
    write_blocked: AtomicU64,
    /// HTTP/1.1 only: a response body is not read further while the
    /// client's socket is full (see [`ConnActivity::body_held`]).
    hold_body_when_blocked: AtomicBool,
    /// The client is dropped for not reading: its socket is reset, not
    /// closed (see [`WriteWatch`]).
    reset_on_close: AtomicBool,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            probe: Arc::new(IdleProbe::default()),
            write_blocked: AtomicU64::new(0),
            hold_body_when_blocked: AtomicBool::new(false),
            reset_on_close: AtomicBool::new(false),
        }
    }
}

impl ConnActivity {
    /// A request begins. The time is not noted: while one is in flight the
    /// connection is not idle whatever `last_ms` says, and its end notes it.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended at `now`.
    pub fn request_finished(&self, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.probe.request_finished();
        self.last_ms.store(
            now.saturating_duration_since(self.epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// Requests being served on the connection.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Notes a write's outcome; true when it was the first to go through
    /// after the socket had been full.
    fn note_write<T>(&self, r: &Poll<T>) -> bool {
        match r {
            Poll::Pending => {
                if self.write_blocked.load(Ordering::Relaxed) == 0 {
                    let now = self.epoch.elapsed().as_millis() as u64;
                    self.write_blocked.store(now + 1, Ordering::Relaxed);
                }
                false
            }
            Poll::Ready(_) => {
                if self.write_blocked.load(Ordering::Relaxed) != 0 {
                    self.write_blocked.store(0, Ordering::Relaxed);
                    return true;
                }
                false
            }
        }
    }

    /// Whether the response body should wait: HTTP/1.1, and the client's
    /// socket was full at the last write. hyper would otherwise go on
    /// pulling body chunks into its write queue while the client does not
    /// read, up to its `max_buf_size` (the listener's `max_header_bytes`,
    /// 64 KiB by default), each one read from the upstream first. Held, a
    /// stalled download pins the one or two chunks taken before the socket
    /// filled, not four or five, and the upstream is not read further (TCP
    /// flow control stops the backend): 17 KiB held against 65 KiB
    /// (`tests/limits.rs`).
    ///
    /// Safe because HTTP/1.1 polls the body and writes the socket in one
    /// task: a full socket means hyper (or the TLS layer under it) holds
    /// unwritten bytes and the task is registered for writability; the
    /// write that goes through wakes the task again ([`WriteWatch`]), and
    /// the body is polled once more.
    /// HTTP/2 polls bodies in per-stream tasks and is left alone (its flow
    /// control bounds what a stream holds).
    pub fn body_held(&self) -> bool {
        self.holds_bodies() && self.write_blocked.load(Ordering::Relaxed) != 0
    }

    /// Whether response bodies on this connection are held while its socket
    /// is full (HTTP/1.1), see [`ConnActivity::body_held`].
    pub fn holds_bodies(&self) -> bool {
        self.hold_body_when_blocked.load(Ordering::Relaxed)
    }

    /// How long until a stalled write to the client reaches `limit`; `None`
    /// when it has (the client stopped reading).
    fn send_remaining(&self, limit: Duration) -> Option<Duration> {
        let since = self.write_blocked.load(Ordering::Relaxed);
        if since == 0 {
            return Some(limit);
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let stalled = Duration::from_millis(now.saturating_sub(since - 1));
        limit.checked_sub(stalled).filter(|d| !d.is_zero())
    }

    /// How long until the connection counts as idle; `None` when it is.
    fn idle_remaining(&self, idle: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Some(idle);
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let quiet = self.epoch.elapsed().saturating_sub(last);
        idle.checked_sub(quiet).filter(|d| !d.is_zero())
    }
}

/// The client socket, noting in [`ConnActivity`] when writes to it stall
/// (for `send_timeout`), and reset when it closes after a client was
/// dropped for not reading ([`ConnActivity::reset_on_close`]).
struct WriteWatch {
    io: TcpStream,
    activity: Arc<ConnActivity>,
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        if self.activity.reset_on_close.load(Ordering::Relaxed) {
            // Linger 0: the close sends RST and frees the unsent bytes now.
            let _ = socket2::SockRef::from(&self.io).set_linger(Some(Duration::ZERO));
        }
    }
}

impl WriteWatch {
    /// Records a write's outcome. The first write through after the socket
    /// was full wakes the task: a body held meanwhile may go on.
    fn noted<T>(&self, cx: &Context<'_>, r: Poll<T>) -> Poll<T> {
        if self.activity.note_write(&r) {
            cx.waker().wake_by_ref();
        }
        r
    }
}

impl AsyncRead for WriteWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteWatch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl WaitReadable for WriteWatch {
    fn wait_readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.io.wait_readable()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener `{name}`: {source}")]
    Tls {
        name: String,
        source: crate::tls::TlsError,
    },
    #[error("{0}")]
    Table(String),
}

/// Uses the socket a previous process handed over for this listener when
/// its address matches the config, otherwise binds a new one.
fn adopt_or_bind(lc: &ListenerConfig, inherited: &mut Inherited) -> std::io::Result<TcpListener> {
    if let Some(fd) = inherited.take(&format!("listener:{}", lc.name)) {
        let std_listener = std::net::TcpListener::from(fd);
        let addr = std_listener.local_addr()?;
        if addr == lc.listen || (lc.listen.port() == 0 && addr.ip() == lc.listen.ip()) {
            std_listener.set_nonblocking(true)?;
            tracing::info!(listener = %lc.name, %addr, "listening socket taken over from the previous process");
            return TcpListener::from_std(std_listener);
        }
        tracing::warn!(listener = %lc.name, inherited = %addr, configured = %lc.listen, "inherited socket has another address; binding anew");
    }
    bind(lc.listen)
}

/// Binds a listening socket (SO_REUSEADDR, a deep backlog).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// A running proxy.
#[derive(Debug)]
pub struct Server {
    pub table: Arc<Table>,
    pub metrics: Arc<Metrics>,
    addrs: Vec<(String, SocketAddr)>,
    /// Each TLS listener's certificate resolver, for reloads.
    pub tls_resolvers: Vec<(String, Arc<SniResolver>)>,
    /// Duplicates of the listening sockets, to hand to a successor.
    pub listener_fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// The access log's writer thread, joined after the drain.
    access_writer: Option<std::thread::JoinHandle<()>>,
    shutdown: CancellationToken,
    /// Cancelled at the drain deadline: whatever still runs is dropped (its
    /// connections reset) rather than left behind.
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connection tasks still running at the deadline (they are dropped,
    /// which resets their connections).
    pub abandoned: usize,
    pub elapsed: Duration,
}

impl Server {
    /// Builds the table, binds every listener and starts serving.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let metrics = Metrics::new();
        let table = Arc::new(Table::new(config, metrics.clone()).map_err(StartError::Table)?);
        Server::start_with(config, table, &mut Inherited::default()).await
    }

    /// Starts serving `table` on the config's listeners, adopting sockets
    /// inherited from a previous process (`listener:<name>`) where their
    /// address still matches.
    pub async fn start_with(
        config: &Config,
        table: Arc<Table>,
        inherited: &mut Inherited,
    ) -> Result<Server, StartError> {
        crate::tls::install_provider();
        let metrics = table.metrics().clone();
        let shutdown = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut addrs = Vec::new();
        let mut tls_resolvers = Vec::new();
        let mut bound = Vec::new();
        let mut listener_fds = Vec::new();
        let (access_log, access_writer) = match &config.access_log {
            Some(target) => {
                let (log, writer) =
                    crate::access_log::AccessLog::start(target, metrics.access_log_dropped.clone())
                        .map_err(|e| StartError::Table(format!("access log {target:?}: {e}")))?;
                (Some(log), Some(writer))
            }
            None => (None, None),
        };
        for (index, lc) in config.listeners.iter().enumerate() {
            let acceptor = match &lc.tls {
                Some(t) => {
                    let (cfg, resolver) =
                        crate::tls::server_config(t).map_err(|source| StartError::Tls {
                            name: lc.name.clone(),
                            source,
                        })?;
                    metrics
                        .tls_cert_not_after
                        .with_label_values(&[&lc.name])
                        .set(resolver.store.load().not_after);
                    tls_resolvers.push((lc.name.clone(), resolver));
                    Some(TlsAcceptor::from(cfg))
                }
                None => None,
            };
            let listener = adopt_or_bind(lc, inherited).map_err(|source| StartError::Bind {
                name: lc.name.clone(),
                addr: lc.listen,
                source,
            })?;
            if let Ok(fd) = listener.as_fd().try_clone_to_owned() {
                listener_fds.push((format!("listener:{}", lc.name), fd));
            }
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                name: lc.name.clone(),
                addr: lc.listen,
                source,
            })?;
            addrs.push((lc.name.clone(), local));
            let ctx = Arc::new(ListenerCtx::new(
                index,
                lc.clone(),
                &metrics,
                access_log.clone(),
            ));
            bound.push((ctx, listener, acceptor));
        }
        let conns = Arc::new(ConnSet::default());
        conns.follow(shutdown.clone(), hard_stop.clone());
        for (ctx, listener, acceptor) in bound {
            let protocols = Arc::new(protocols(&ctx.config));
            tracker.spawn(accept_loop(
                ctx,
                listener,
                acceptor,
                protocols,
                table.clone(),
                Stops {
                    graceful: shutdown.clone(),
                    hard: hard_stop.clone(),
                    tracker: tracker.clone(),
                    conns: conns.clone(),
                },
            ));
        }
        // Idle upstream connections are closed in the background.
        {
            let table = table.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => table.reap_idle(),
                        _ = shutdown.cancelled() => break,
                    }
                }
            });
        }
        Ok(Server {
            table,
            metrics,
            addrs,
            tls_resolvers,
            listener_fds,
            access_writer,
            shutdown,
            hard_stop,
            tracker,
            drain_timeout: config.runtime.drain_timeout,
        })
    }

    /// The bound address of a listener (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    /// A token that starts the drain when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, asks every connection to finish, and waits for them
    /// up to the drain deadline.
    pub async fn shutdown(mut self) -> DrainReport {
        let start = Instant::now();
        // The duplicates kept for a successor would hold the listening
        // sockets open after the accept loops drop theirs: new connections
        // would wait in a backlog nobody accepts from until the drain ends,
        // instead of being refused now.
        self.listener_fds.clear();
        self.shutdown.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(self.drain_timeout, self.tracker.wait()).await;
        let abandoned = if done.is_ok() { 0 } else { self.tracker.len() };
        if abandoned > 0 {
            self.hard_stop.cancel();
            // Dropping a connection future is immediate; this only waits for
            // the tasks to notice.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        }
        // Every connection is gone, so is every access-log sender: the
        // writer writes the tail and ends.
        if let Some(writer) = self.access_writer {
            let join = tokio::task::spawn_blocking(move || writer.join());
            let _ = tokio::time::timeout(Duration::from_secs(2), join).await;
        }
        DrainReport {
            abandoned,
            elapsed: start.elapsed(),
        }
    }
}

/// hyper's HTTP/1.1 and HTTP/2 server settings for one listener.
#[derive(Debug)]
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

fn protocols(lc: &ListenerConfig) -> Protocols {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(lc.header_timeout)
        .max_buf_size(lc.max_header_bytes.max(8192))
        .keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(lc.h2_max_concurrent_streams)
        .max_header_list_size(lc.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    Protocols { h1, h2 }
}

/// The shutdown signals every task listens to.
#[derive(Debug, Clone)]
pub struct Stops {
    /// Stop accepting; finish what is in flight.
    pub graceful: CancellationToken,
    /// The drain deadline passed: drop everything.
    pub hard: CancellationToken,
    /// Tracks connection and tunnel tasks so the drain can wait for them.
    pub tracker: TaskTracker,
    /// The open client connections: woken when `graceful` is cancelled,
    /// aborted when `hard` is, so no request waits on either token.
    pub conns: Arc<ConnSet>,
}

async fn accept_loop(
    ctx: Arc<ListenerCtx>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    protocols: Arc<Protocols>,
    table: Arc<Table>,
    stops: Stops,
) {
    let shutdown = stops.graceful.clone();
    let tracker = stops.tracker.clone();
    let permits = Arc::new(Semaphore::new(ctx.config.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    tracing::warn!(listener = %ctx.config.name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let tls = tls.clone();
        stops.conns.spawn(&tracker, |member| {
            let conn = Connection {
                ctx: ctx.clone(),
                table: table.clone(),
                protocols: protocols.clone(),
                stops: stops.clone(),
                member,
            };
            async move {
                conn.run(stream, peer, tls, permit).await;
            }
        });
    }
    tracing::debug!(listener = %ctx.config.name, "accept loop stopped");
}

struct Connection {
    ctx: Arc<ListenerCtx>,
    table: Arc<Table>,
    protocols: Arc<Protocols>,
    stops: Stops,
    /// Its place in [`Stops::conns`]: the drain wakes it, the deadline
    /// aborts its task.
    member: Member,
}

/// A client connection's place under `max_connections` and in
/// `cyan_connections_open`, released however the connection ends. Shared with
/// an upgraded tunnel (WebSocket), which outlives hyper's connection future
/// but is still the client's open socket: the slot frees when both are done.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connection {
    async fn run(
        self,
        mut stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        permit: OwnedSemaphorePermit,
    ) {
        self.ctx.connections_open.inc();
        let slot = Arc::new(ConnSlot {
            _permit: permit,
            open: self.ctx.connections_open.clone(),
        });
        let _ = stream.set_nodelay(true);
        let lc = &self.ctx.config;
        if let Some(lowat) = lc.notsent_lowat_bytes {
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(lowat) {
                tracing::debug!(%peer, error = %e, "TCP_NOTSENT_LOWAT refused");
            }
        }
        let mut client = peer;
        if lc.proxy_protocol && lc.is_trusted(peer.ip()) {
            // Boxed, like every large one-off step below: a connection task
            // is as big as its largest state, and idle connections should
            // not pay for handshakes long done.
            let read = Box::pin(crate::proxy_protocol::read_header(&mut stream));
            match tokio::time::timeout(lc.handshake_timeout, read).await {
                Ok(Ok(Some(src))) => client = src,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "PROXY header refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "PROXY header timed out");
                    return;
                }
            }
        }
        let activity = Arc::new(ConnActivity::default());
        let stream = WriteWatch {
            io: stream,
            activity: activity.clone(),
        };
        let conn = Arc::new(ConnCtx {
            listener: self.ctx.clone(),
            peer: client,
            peer_value: crate::headers::peer_value(client.ip()),
            trusted_peer: lc.is_trusted(client.ip()),
            tls: tls.is_some(),
            activity,
            stops: self.stops.clone(),
            slot,
        });
        match tls {
            None => self.serve(stream, conn).await,
            Some(acceptor) => {
                let accept = Box::pin(acceptor.accept(stream));
                match tokio::time::timeout(lc.handshake_timeout, accept).await {
                    Ok(Ok(s)) => Box::pin(self.serve(s, conn)).await,
                    Ok(Err(e)) => {
                        self.ctx.tls_handshake_errors.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        self.ctx.tls_handshake_errors.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            }
        }
    }

    /// Tells HTTP/2 from HTTP/1.1 by the first bytes and serves the
    /// connection. A client that sends nothing is closed after `idle_timeout`,
    /// or at once when a drain begins (after [`FIRST_REQUEST_GRACE`]).
    async fn serve<IO>(&self, mut io: IO, conn: Arc<ConnCtx>)
    where
        IO: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
    {
        let accepted = Instant::now();
        let first = tokio::select! {
            r = tokio::time::timeout(self.ctx.config.idle_timeout, keepalive::sniff(&mut io)) => r,
            _ = self.stops.hard.cancelled() => return,
            _ = async {
                self.stops.graceful.cancelled().await;
                tokio::time::sleep(FIRST_REQUEST_GRACE.saturating_sub(accepted.elapsed())).await;
            } => return,
        };
        let (proto, pre) = match first {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection failed before its first request");
                return;
            }
            Err(_) => {
                tracing::debug!("connection idle before its first request");
                return;
            }
        };
        let activity = conn.activity.clone();
        let table = self.table.clone();
        let fast_conn = conn.clone();
        let handler = move |req: Request<Incoming>| {
            // Counted here, when hyper hands the request over, so the
            // keep-alive release never sees a parsed request as idle.
            conn.activity.request_started();
            if !req.body().is_end_stream() {
                conn.activity.probe.body_opened();
            }
            if req.headers().contains_key(http::header::UPGRADE) {
                conn.activity.probe.pin();
            }
            let conn = conn.clone();
            let table = table.clone();
            async move {
                let req = req.map(proxy::ClientIn::Hyper);
                Ok::<_, Infallible>(proxy::for_hyper(proxy::handle(&table, &conn, req).await))
            }
        };
        match proto {
            Sniffed::Http2 => {
                // Boxed: hyper runs every HTTP/2 stream as a task of its
                // own, and the request's future (~4 KB) was moved about ten
                // times on its way into the task's stage, ~4k instructions
                // per request (callgrind). Boxed it is copied once.
                let service = service_fn(move |req| Box::pin(handler(req)));
                let io = TokioIo::new(Rewind::new(io, pre));
                let mut http = Box::pin(self.protocols.h2.serve_connection(io, service));
                self.drive(http.as_mut(), &activity, None).await;
            }
            Sniffed::Http1 => {
                activity
                    .hold_body_when_blocked
                    .store(true, Ordering::Relaxed);
                self.serve_h1(io, pre, service_fn(handler), &fast_conn)
                    .await
            }
        }
    }

    /// HTTP/1.1: requests cyan's own path takes are served here
    /// ([`crate::h1server`]); for any other, one hyper connection per busy
    /// period. Between requests only the socket is held (see
    /// [`crate::keepalive`]).
    async fn serve_h1<IO, S>(&self, mut io: IO, mut pre: Bytes, service: S, conn: &Arc<ConnCtx>)
    where
        IO: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
        S: HttpService<Incoming, ResBody = RespBody> + Clone + Unpin + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // One idle timer for the connection's life, set lazily: requests
        // do not push it back. When it fires, the time since the last
        // request ended ([`ConnActivity::idle_remaining`]) says whether the
        // connection has been idle that long; if not, it is set for the
        // rest. A timer pushed back before each wait cost a clock read and
        // a timer update every request; a timer per wait, a timer wheel
        // insert and removal.
        let idle_timeout = self.ctx.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        loop {
            if pre.is_empty() {
                tokio::select! {
                    // Biased: bytes already here are a request to serve
                    // (with `Connection: close` in a drain), not to reset.
                    biased;
                    r = io.wait_readable() => if r.is_err() { return },
                    _ = &mut idle => match conn.activity.idle_remaining(idle_timeout) {
                        None => return,
                        Some(left) => {
                            idle.as_mut().reset(tokio::time::Instant::now() + left);
                            continue;
                        }
                    },
                    // The drain, through the connection's own waker (a token
                    // wait per request cost a shared waiter list's lock).
                    // The hard stop is never waited for: it aborts the task.
                    _ = self.member.drained(&self.stops.graceful) => return,
                }
            }
            if self.ctx.config.fast_http1 {
                // Boxed: inline, the request's future (the handler's, ~5
                // KiB) would be part of the connection task for its whole
                // life, idle keep-alive included: 10.35 KiB per idle
                // connection measured, against 4.25 with it boxed.
                match Box::pin(self.fast_h1(&mut io, pre, conn)).await {
                    Fast::Again(rest) => {
                        pre = rest;
                        continue;
                    }
                    Fast::End => return,
                    Fast::Hyper(bytes) => pre = bytes,
                }
            }
            let activity = &*conn.activity;
            let watched = Watched::new(Rewind::new(io, pre), activity.probe.clone());
            let mut http = Box::new(
                self.protocols
                    .h1
                    .serve_connection(TokioIo::new(watched), service.clone())
                    .with_upgrades(),
            );
            match self
                .drive(Pin::new(&mut *http), activity, Some(&activity.probe))
                .await
            {
                Outcome::Ended => return,
                Outcome::Released => {
                    let Some(parts) = http.into_parts() else {
                        return;
                    };
                    let (socket, rest) = parts.io.into_inner().into_inner().into_parts();
                    io = socket;
                    pre = keepalive::leftover(parts.read_buf, rest);
                }
            }
        }
    }

    /// One request on cyan's own HTTP/1.1 path, if it is one the path takes
    /// (see [`crate::h1server`]): reads what the client sent (once, without
    /// waiting, unless a whole head is already here), then parses, handles
    /// and answers it.
    async fn fast_h1<IO>(&self, io: &mut IO, pre: Bytes, conn: &Arc<ConnCtx>) -> Fast
    where
        IO: AsyncRead + AsyncWrite + WaitReadable + Unpin,
    {
        let mut buf = BytesMut::with_capacity(h1server::READ_BYTES.max(pre.len()));
        buf.extend_from_slice(&pre);
        drop(pre);
        if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            // One read of what is already here, never a wait: a head still
            // coming goes to hyper, whose header timer then runs from now
            // (`header_timeout` holds as it always did).
            let read = std::future::poll_fn(|cx| {
                Poll::Ready(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *io),
                    cx,
                    &mut buf,
                ))
            })
            .await;
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Fast::End,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Fast::Hyper(buf.freeze()),
            }
        }
        let parsed = match h1server::parse(buf) {
            Ok(p) => p,
            Err(bytes) => return Fast::Hyper(bytes),
        };
        let activity = &conn.activity;
        activity.request_started();
        let head_request = parsed.parts.method == http::Method::HEAD;
        let req = Request::from_parts(parsed.parts, proxy::ClientIn::Lines(parsed.head));
        // While the answer is awaited the client is watched, as hyper does:
        // one that leaves drops the request (counted 499, never an upstream
        // failure). Bytes it sends meanwhile (a pipelined request) are kept.
        // Pinned where it is made: `tokio::pin!` on a binding moved the
        // whole future (kilobytes) once more.
        let mut handling = std::pin::pin!(proxy::handle(&self.table, conn, req));
        let mut more = BytesMut::new();
        let resp = loop {
            tokio::select! {
                biased;
                r = handling.as_mut() => break r,
                r = io.wait_readable(), if more.len() < h1server::READ_BYTES => {
                    if r.is_err() {
                        return Fast::End;
                    }
                    // Read into `more` directly: a stack buffer held across
                    // this await would grow every request's future.
                    more.reserve(2048);
                    let read = std::future::poll_fn(|cx| {
                        Poll::Ready(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut more))
                    })
                    .await;
                    match read {
                        Poll::Ready(Ok(0)) => return Fast::End,
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) => return Fast::End,
                        Poll::Pending => {}
                    }
                }
            }
        };
        let close = self.stops.graceful.is_cancelled();
        let writing =
            h1server::write_response(io, resp, head_request, close, self.ctx.config.send_timeout);
        // The hard stop aborts the connection's task (`Stops::conns`): no
        // wait on it here or above.
        let written = writing.await;
        // Never a slice of the request's buffer: kept through an idle wait
        // it would hold the whole buffer.
        let rest = if more.is_empty() {
            if parsed.rest.is_empty() {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(&parsed.rest)
            }
        } else {
            let mut all = BytesMut::with_capacity(parsed.rest.len() + more.len());
            all.extend_from_slice(&parsed.rest);
            all.extend_from_slice(&more);
            all.freeze()
        };
        match written {
            Written::KeepAlive => Fast::Again(rest),
            Written::Stalled => {
                tracing::debug!("client stopped reading (send_timeout): resetting");
                activity.reset_on_close.store(true, Ordering::Relaxed);
                Fast::End
            }
            Written::Close | Written::Broken => Fast::End,
        }
    }

    /// Runs a hyper connection under the idle watchdog and the drain. With
    /// a `probe` (HTTP/1.1), returns [`Outcome::Released`] as soon as hyper
    /// sits idle between requests so the caller can take the socket back.
    async fn drive<C>(
        &self,
        mut http: Pin<&mut C>,
        activity: &ConnActivity,
        probe: Option<&IdleProbe>,
    ) -> Outcome
    where
        C: Future<Output = hyper::Result<()>> + Graceful,
    {
        let idle = self.ctx.config.idle_timeout;
        let send_timeout = self.ctx.config.send_timeout;
        let mut closing = false;
        let mut draining = false;
        let mut wait = idle.min(send_timeout);
        // hyper went idle and the release timer runs (see RELEASE_LINGER).
        let mut lingering = false;
        // A request that arrived during a drain (a first request within its
        // grace): served with `Connection: close` (HTTP/2: GOAWAY after it).
        // hyper closes a connection asked to shut down before it has read
        // anything, so it is asked only after its first poll has read the
        // bytes already here.
        let mut graceful_after_poll = self.stops.graceful.is_cancelled();
        if graceful_after_poll {
            draining = true;
            closing = true;
        }
        loop {
            let step = std::future::poll_fn(|cx| match http.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if graceful_after_poll => {
                    graceful_after_poll = false;
                    http.as_mut().graceful();
                    // hyper may be done now (nothing was there to read).
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Pending
                    if !closing
                        && !lingering
                        && probe.is_some_and(|p| p.releasable(activity.in_flight())) =>
                {
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            });
            tokio::select! {
                r = step => match r {
                    Some(Ok(())) => return Outcome::Ended,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        return Outcome::Ended;
                    }
                    None => {
                        lingering = true;
                        wait = RELEASE_LINGER;
                    }
                },
                _ = self.member.drained(&self.stops.graceful), if !draining && !closing => {
                    draining = true;
                    wait = Duration::ZERO;
                }
                _ = tokio::time::sleep(wait) => {
                    // A client that stopped reading holds its response (and
                    // the upstream connection) forever: no graceful end is
                    // possible, the connection is dropped.
                    let Some(send_rest) = activity.send_remaining(send_timeout) else {
                        tracing::debug!("client stopped reading (send_timeout): resetting");
                        activity.reset_on_close.store(true, Ordering::Relaxed);
                        return Outcome::Ended;
                    };
                    wait = send_rest;
                    if closing {
                        continue;
                    }
                    if draining {
                        closing = true;
                        http.as_mut().graceful();
                        continue;
                    }
                    if lingering {
                        lingering = false;
                        if probe.is_some_and(|p| p.releasable(activity.in_flight())) {
                            return Outcome::Released;
                        }
                    }
                    match activity.idle_remaining(idle) {
                        Some(rest) => wait = rest.min(send_rest),
                        None => {
                            closing = true;
                            http.as_mut().graceful();
                        }
                    }
                }
            }
        }
    }
}

/// How a request on cyan's own HTTP/1.1 path went.
enum Fast {
    /// Served; the connection goes on (with these bytes already read).
    Again(Bytes),
    /// The connection is over.
    End,
    /// Not a request the path takes: hyper gets these bytes and the socket.
    Hyper(Bytes),
}

/// How a hyper connection handed back control.
enum Outcome {
    /// The connection is over.
    Ended,
    /// HTTP/1.1 went idle between requests; the socket can be taken back.
    Released,
}

/// hyper's graceful shutdown, for both protocols' connection types.
trait Graceful {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Graceful for http2::Connection<I, S, E>
where
    S: HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
