//! Connections to one endpoint: pooled HTTP/1.1 keep-alive connections or one
//! shared HTTP/2 connection, over TCP or TLS, with connect and response-head
//! timeouts.
//!
//! An [`Upstream`] outlives routing tables: a new table built for the same
//! (service, color, address, settings) reuses it, so idle connections and the
//! in-flight count survive every swap.
//!
//! The pool is lock-free on the request path: idle HTTP/1.1 senders sit in a
//! bounded `ArrayQueue`, the HTTP/2 sender in an `ArcSwapOption`. Only opening
//! a new HTTP/2 connection takes an (async) mutex, so a burst opens one
//! connection rather than hundreds.
//!
//! [`Upstream::send`] never loses a request it could not send: a pooled
//! connection found closed gives the request back (hyper's
//! `try_send_request`) and it goes out on a fresh connection; a failure before
//! anything was written returns it to the caller for a retry elsewhere.
//!
//! Bodiless GET and HEAD requests to a plaintext HTTP/1.1 endpoint skip
//! hyper's client and go out on cyan's own ([`crate::h1client`]), from a
//! pool of plain sockets kept next to hyper's: the request's task writes
//! the head and reads the answer itself. A pooled socket the endpoint has
//! closed is seen before it is used ([`RawConn::alive`]) and dropped; a
//! request written is never sent again, as with hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::body::{BodySent, BoxError, ReqBody};
use crate::config::{Protocol, UpstreamSettings};
use crate::h1client::{self, RawBody, RawConn, RawHead};

/// Why an upstream exchange failed; mapped to a status in one place
/// (`proxy::error_response`).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("TLS/HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: BoxError },
    #[error("{addr} sent no response head within {after:?}")]
    ResponseTimeout { addr: SocketAddr, after: Duration },
    #[error("exchange with {addr} failed: {source}")]
    Exchange { addr: SocketAddr, source: BoxError },
}

impl UpstreamError {
    /// Whether nothing of the request can have reached the endpoint.
    pub fn before_send(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
        )
    }
}

/// A failed send, with the request when it was never written.
#[derive(Debug)]
pub struct SendFailure {
    pub error: UpstreamError,
    pub request: Option<Request<ReqBody>>,
}

/// A connection to return to the pool once its response has been read.
#[derive(Debug)]
pub enum Pooled {
    H1(H1Conn),
    /// cyan's own client's socket, handed over by its body at the end.
    Raw(RawConn),
}

/// A response body from either client.
#[derive(Debug)]
pub enum UpBody {
    Hyper(Incoming),
    /// With the head's lines: the response's `HeaderMap` is left empty
    /// ([`crate::h1client::RawHead`]).
    Raw(RawBody, crate::h1client::RawHead),
}

impl Pooled {
    /// The response was abandoned (the client left, or it was refused):
    /// the connection cannot be reused, so its task is stopped now and its
    /// socket reset. Left alone, hyper would read on into a buffer nobody
    /// takes, then shut the socket down gracefully (a recv of up to
    /// `read_buffer_bytes` and a shutdown, ~30 µs of a worker on loopback,
    /// seen in the slow-reader attack's syscall trace), and the graceful
    /// close would park cyan's end in TIME_WAIT, one local port per
    /// abandoned download. The reset is what HAProxy sends on an aborted
    /// server connection too.
    pub fn abandon(self) {
        match self {
            Pooled::H1(c) => {
                c.abandoned.store(true, Ordering::Relaxed);
                c.task.abort();
            }
            Pooled::Raw(c) => c.reset(),
        }
    }
}

/// An HTTP/1.1 upstream connection: hyper's sender, and a handle on the task
/// that drives the connection.
#[derive(Debug)]
pub struct H1Conn {
    tx: http1::SendRequest<ReqBody>,
    task: tokio::task::AbortHandle,
    /// Shared with the socket ([`UpstreamTcp`]): reset it when it closes.
    abandoned: Arc<AtomicBool>,
}

/// An upstream TCP socket (under TLS when there is TLS) that closes with a
/// reset once its connection was abandoned ([`Pooled::abandon`]).
struct UpstreamTcp {
    io: TcpStream,
    abandoned: Arc<AtomicBool>,
}

impl Drop for UpstreamTcp {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Relaxed) {
            let _ = socket2::SockRef::from(&self.io).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for UpstreamTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

enum Sender {
    H1(H1Conn),
    H2(http2::SendRequest<ReqBody>),
}

#[derive(Debug)]
struct Idle {
    conn: H1Conn,
    since: Instant,
}

#[derive(Debug)]
struct RawIdle {
    conn: RawConn,
    since: Instant,
}

/// Client-side TLS for an endpoint.
#[derive(Clone)]
pub struct UpstreamTlsConfig {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTlsConfig")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// One endpoint's connections and live load.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub settings: UpstreamSettings,
    tls: Option<UpstreamTlsConfig>,
    in_flight: AtomicU32,
    /// Consecutive failed requests (passive health); 0 after any success.
    failures: AtomicU32,
    idle: ArrayQueue<Idle>,
    /// Idle sockets of cyan's own HTTP/1.1 client.
    raw_idle: ArrayQueue<RawIdle>,
    /// Bodiless GET and HEAD take cyan's own client (plaintext HTTP/1.1).
    raw: bool,
    h2: ArcSwapOption<http2::SendRequest<ReqBody>>,
    h2_connect: tokio::sync::Mutex<()>,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        settings: UpstreamSettings,
        tls: Option<UpstreamTlsConfig>,
    ) -> Upstream {
        Upstream {
            addr,
            idle: ArrayQueue::new(settings.max_idle_per_endpoint),
            raw_idle: ArrayQueue::new(settings.max_idle_per_endpoint),
            raw: settings.protocol == Protocol::Http1 && tls.is_none() && settings.fast_http1,
            settings,
            tls,
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            h2: ArcSwapOption::empty(),
            h2_connect: tokio::sync::Mutex::new(()),
        }
    }

    /// Requests currently sent to this endpoint.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight_inc(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn in_flight_dec(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a finished request for passive health: a failure (connect
    /// error, timeout, reset, 5xx) counts up, anything else resets.
    #[inline]
    pub fn record_outcome(&self, failed: bool) {
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        } else if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Starts counting afresh (after an ejection).
    pub fn reset_failures(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Idle HTTP/1.1 connections held.
    pub fn idle_connections(&self) -> usize {
        self.idle.len() + self.raw_idle.len()
    }

    /// Returns a connection whose response has been read to its end. hyper
    /// marks it ready a moment after the body's end reached us; one not yet
    /// ready is awaited (bounded) in a small task, off the request path.
    pub fn check_in(&self, pooled: Pooled) {
        let conn = match pooled {
            Pooled::H1(conn) => conn,
            Pooled::Raw(mut conn) => {
                conn.release_buffer();
                let _ = self.raw_idle.push(RawIdle {
                    conn,
                    since: Instant::now(),
                });
                return;
            }
        };
        if conn.tx.is_closed() {
            return;
        }
        // Its response has been read to the end, so hyper marks it ready a
        // moment from now (its connection task has not run yet). Pool it at
        // once: the next request must find it, not open a new connection.
        let _ = self.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes idle connections older than the idle timeout.
    pub fn reap_idle(&self) {
        for _ in 0..self.raw_idle.len() {
            match self.raw_idle.pop() {
                Some(i) if i.since.elapsed() < self.settings.idle_timeout => {
                    let _ = self.raw_idle.push(i);
                }
                Some(_) => {}
                None => break,
            }
        }
        let n = self.idle.len();
        for _ in 0..n {
            match self.idle.pop() {
                Some(i) if self.usable(&i) => {
                    let _ = self.idle.push(i);
                }
                Some(_) => {}
                None => break,
            }
        }
    }

    /// Open and young enough (it may still be settling into readiness).
    fn usable(&self, i: &Idle) -> bool {
        !i.conn.tx.is_closed() && i.since.elapsed() < self.settings.idle_timeout
    }

    async fn checkout(&self) -> Option<Sender> {
        match self.settings.protocol {
            Protocol::Http1 => {
                while let Some(mut i) = self.idle.pop() {
                    if !self.usable(&i) {
                        continue;
                    }
                    if i.conn.tx.is_ready() {
                        return Some(Sender::H1(i.conn));
                    }
                    // Checked in a moment ago, not marked ready yet: that
                    // takes microseconds; a connection that does not get
                    // there quickly is dropped.
                    if let Ok(Ok(())) =
                        tokio::time::timeout(Duration::from_millis(20), i.conn.tx.ready()).await
                    {
                        return Some(Sender::H1(i.conn));
                    }
                }
                None
            }
            Protocol::H2 | Protocol::H2c => {
                let g = self.h2.load();
                match g.as_ref() {
                    Some(tx) if !tx.is_closed() => Some(Sender::H2((**tx).clone())),
                    _ => None,
                }
            }
        }
    }

    async fn connect_sender(&self) -> Result<Sender, UpstreamError> {
        match self.settings.protocol {
            Protocol::Http1 => self.connect().await,
            Protocol::H2 | Protocol::H2c => {
                let _one_at_a_time = self.h2_connect.lock().await;
                if let Some(s) = self.checkout().await {
                    return Ok(s);
                }
                let s = self.connect().await?;
                if let Sender::H2(tx) = &s {
                    self.h2.store(Some(Arc::new(tx.clone())));
                }
                Ok(s)
            }
        }
    }

    /// A TCP connection to the endpoint (no delay), by `deadline`.
    async fn connect_tcp(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<TcpStream, UpstreamError> {
        let addr = self.addr;
        let after = self.settings.connect_timeout;
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => Err(UpstreamError::ConnectTimeout { addr, after }),
            Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// Opens a new connection (TCP, optional TLS, HTTP handshake).
    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let addr = self.addr;
        let limit = self.settings.connect_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let tcp = self.connect_tcp(deadline).await?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let tcp = UpstreamTcp {
            io: tcp,
            abandoned: abandoned.clone(),
        };
        let handshake_err = |source: BoxError| UpstreamError::Handshake { addr, source };
        let fut = async {
            match &self.tls {
                None => handshake(tcp, &self.settings, abandoned).await,
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.server_name.clone(), tcp)
                        .await
                        .map_err(|e| Box::new(e) as BoxError)?;
                    handshake(stream, &self.settings, abandoned).await
                }
            }
        };
        match tokio::time::timeout_at(deadline, fut).await {
            Err(_) => Err(UpstreamError::ConnectTimeout { addr, after: limit }),
            Ok(Err(e)) => Err(handshake_err(e)),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// Sends a request and waits for the response head.
    ///
    /// The response timer starts when `body_sent` fires (the client's body
    /// has been read to its end) or at once for bodiless requests.
    ///
    /// Not an `async fn`, and hyper's branch boxed: an `async fn` stores its
    /// arguments twice (as captured and as locals), and the request's
    /// future, copied as it is boxed per request, held hyper's branch
    /// (~1.5 KiB) where cyan's own client needs less.
    ///
    /// `lines`: the request's headers as the lines cyan's own server read
    /// (its map then empty); only for an endpoint that
    /// [takes them](Upstream::takes_lines).
    pub fn send<'a>(
        self: &'a Arc<Self>,
        mut req: Request<ReqBody>,
        lines: Option<&'a RawHead>,
        body_sent: Option<&'a BodySent>,
    ) -> impl Future<Output = Result<(Response<UpBody>, Option<Pooled>), SendFailure>> + Send + 'a
    {
        use futures_util::future::Either;
        if self.takes_lines(&req) {
            Either::Left(self.send_raw(req, lines))
        } else {
            if let Some(l) = lines {
                debug_assert!(false, "header lines sent to an endpoint that takes a map");
                l.clone().append_to(req.headers_mut());
            }
            Either::Right(Box::pin(self.send_hyper(req, body_sent)))
        }
    }

    /// Whether `req` goes through cyan's own client (bodiless GET or HEAD
    /// to a plaintext HTTP/1.1 endpoint), which writes header lines as
    /// they are (hyper's needs a map).
    pub fn takes_lines(&self, req: &Request<ReqBody>) -> bool {
        self.raw && h1client::eligible(req)
    }

    /// [`Upstream::send`] through hyper's client.
    async fn send_hyper(
        self: &Arc<Self>,
        mut req: Request<ReqBody>,
        body_sent: Option<&BodySent>,
    ) -> Result<(Response<UpBody>, Option<Pooled>), SendFailure> {
        let addr = self.addr;
        // Pooled connections may turn out closed; each such attempt gives the
        // request back untouched. Bounded so a broken endpoint cannot spin.
        for _ in 0..4 {
            let (sender, fresh) = match self.checkout().await {
                Some(s) => (s, false),
                // Boxed: connecting (TCP, TLS, HTTP handshake) is a large
                // future and a rare step; inline it would grow every
                // request's future by ~6 KiB, copied on each request.
                None => match Box::pin(self.connect_sender()).await {
                    Ok(s) => (s, true),
                    Err(error) => {
                        return Err(SendFailure {
                            error,
                            request: Some(req),
                        })
                    }
                },
            };
            let result = match sender {
                Sender::H1(mut conn) => {
                    let fut = conn.tx.try_send_request(req);
                    self.await_head(fut, body_sent)
                        .await
                        .map(|resp| (resp.map(UpBody::Hyper), Some(Pooled::H1(conn))))
                }
                Sender::H2(mut tx) => {
                    let fut = tx.try_send_request(req);
                    self.await_head(fut, body_sent)
                        .await
                        .map(|resp| (resp.map(UpBody::Hyper), None))
                }
            };
            match result {
                Ok(ok) => return Ok(ok),
                Err(Attempt::NotSent(r, e)) => {
                    let r = *r;
                    if fresh {
                        return Err(SendFailure {
                            error: UpstreamError::Handshake {
                                addr,
                                source: Box::new(e),
                            },
                            request: Some(r),
                        });
                    }
                    // A stale pooled connection: forget it and go again.
                    if self.settings.protocol != Protocol::Http1 {
                        self.h2.store(None);
                    }
                    req = r;
                }
                Err(Attempt::Failed(error)) => {
                    if self.settings.protocol != Protocol::Http1 {
                        self.drop_h2_if_closed();
                    }
                    return Err(SendFailure {
                        error,
                        request: None,
                    });
                }
            }
        }
        Err(SendFailure {
            error: UpstreamError::Connect {
                addr,
                source: std::io::Error::other("every pooled connection was closed"),
            },
            request: Some(req),
        })
    }

    /// A bodiless GET or HEAD on cyan's own client ([`crate::h1client`]).
    /// The body of the answer owns the socket and hands it back at its end.
    /// Not an `async fn`, for the reason given at [`Upstream::send`].
    #[allow(clippy::manual_async_fn)]
    fn send_raw<'a>(
        self: &'a Arc<Self>,
        req: Request<ReqBody>,
        lines: Option<&'a RawHead>,
    ) -> impl Future<Output = Result<(Response<UpBody>, Option<Pooled>), SendFailure>> + Send + 'a
    {
        async move {
            let addr = self.addr;
            let mut head = Vec::with_capacity(512);
            h1client::encode_head(&req, lines, &mut head);
            let head_request = req.method() == http::Method::HEAD;
            let limit = self.settings.read_buffer_bytes;
            let after = self.settings.response_timeout;
            // A pooled socket is taken only if the endpoint has not closed it
            // (`RawConn::alive`); once the head is written the request is never
            // sent again, whatever happens: it may have reached the endpoint.
            let (mut conn, fresh) = match self.raw_checkout() {
                Some(c) => (c, false),
                None => match Box::pin(self.connect_raw()).await {
                    Ok(c) => (c, true),
                    Err(error) => {
                        return Err(SendFailure {
                            error,
                            request: Some(req),
                        })
                    }
                },
            };
            let mut timer = conn.take_timer(after);
            let answer = {
                let exchange = async {
                    conn.write(&head).await?;
                    conn.read_head(limit, head_request).await
                };
                tokio::select! {
                    // Biased, as `timeout` is: an answer that is here wins.
                    biased;
                    r = exchange => Ok(r),
                    _ = &mut timer => Err(()),
                }
            };
            conn.keep_timer(timer);
            match answer {
                Err(()) => Err(SendFailure {
                    error: UpstreamError::ResponseTimeout { addr, after },
                    request: None,
                }),
                Ok(Ok((parts, raw, framing, reuse))) => {
                    let body = RawBody::new(conn, framing, reuse, limit);
                    Ok((Response::from_parts(parts, UpBody::Raw(body, raw)), None))
                }
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %addr, fresh, error = %e, "upstream exchange failed");
                    Err(SendFailure {
                        error: UpstreamError::Exchange {
                            addr,
                            source: Box::new(e),
                        },
                        request: None,
                    })
                }
            }
        }
    }

    fn raw_checkout(&self) -> Option<RawConn> {
        while let Some(mut i) = self.raw_idle.pop() {
            if i.since.elapsed() < self.settings.idle_timeout && i.conn.alive() {
                return Some(i.conn);
            }
        }
        None
    }

    async fn connect_raw(&self) -> Result<RawConn, UpstreamError> {
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        self.connect_tcp(deadline).await.map(RawConn::new)
    }

    fn drop_h2_if_closed(&self) {
        if let Some(tx) = self.h2.load().as_ref() {
            if tx.is_closed() {
                self.h2.store(None);
            }
        }
    }

    async fn await_head(
        &self,
        fut: impl std::future::Future<
            Output = Result<
                Response<Incoming>,
                hyper::client::conn::TrySendError<Request<ReqBody>>,
            >,
        >,
        body_sent: Option<&BodySent>,
    ) -> Result<Response<Incoming>, Attempt> {
        let addr = self.addr;
        let after = self.settings.response_timeout;
        let timer = async {
            if let Some(sent) = body_sent {
                sent.done.notified().await;
            }
            tokio::time::sleep(after).await;
        };
        tokio::select! {
            biased;
            r = fut => match r {
                Ok(resp) => Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => Err(Attempt::NotSent(Box::new(req), e.into_error())),
                    None => Err(Attempt::Failed(UpstreamError::Exchange { addr, source: Box::new(e.into_error()) })),
                },
            },
            () = timer => Err(Attempt::Failed(UpstreamError::ResponseTimeout { addr, after })),
        }
    }
}

/// How one attempt on one connection failed. The request comes back boxed:
/// this is the rare stale-connection path, and it keeps `Attempt` small.
enum Attempt {
    NotSent(Box<Request<ReqBody>>, hyper::Error),
    Failed(UpstreamError),
}

async fn handshake<IO>(
    io: IO,
    settings: &UpstreamSettings,
    abandoned: Arc<AtomicBool>,
) -> Result<Sender, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match settings.protocol {
        Protocol::Http1 => {
            let (tx, conn) = http1::Builder::new()
                .max_buf_size(settings.read_buffer_bytes)
                .handshake(io)
                .await?;
            let task = tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            })
            .abort_handle();
            Ok(Sender::H1(H1Conn {
                tx,
                task,
                abandoned,
            }))
        }
        Protocol::H2 | Protocol::H2c => {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            Ok(Sender::H2(tx))
        }
    }
}
