//! Body types of the proxy.
//!
//! * [`ReqBody`] goes upstream: the client's streaming body with an idle
//!   timeout (no frame for `body_idle_timeout` → error), or a small fixed body
//!   for cyan's own requests. When the client's body ends it fires a
//!   [`BodySent`] signal so the upstream response timer starts only then (a
//!   1 GiB upload must not trip the response-head timeout). Its first bytes
//!   (all of a small body) can be read ahead before any upstream is chosen
//!   ([`ReqBody::buffer`], `request_buffer_bytes`) and are sent first.
//! * [`RespBody`] goes to the client: the upstream's streaming body, or a
//!   short fixed body (errors, rejections). It carries the [`RequestGuard`]
//!   whose drop is the one place a request is accounted for: metrics,
//!   in-flight counters, the connection pool check-in.
//!
//! An upstream body error is passed on as an error, so the client sees an
//! aborted response (HTTP/1.1: connection closed before the end; HTTP/2:
//! RST_STREAM), never a shorter response that looks complete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::keepalive::IdleProbe;
use crate::metrics::{ErrorKind, PoolMetrics};
use crate::server::ConnActivity;
use crate::upstream::{Pooled, UpBody, Upstream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client stopped sending its body for longer than `body_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body idle for longer than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A client body's progress: notified when it has been fully read, and how
/// many bytes it carried (for the access log).
#[derive(Debug, Default)]
pub struct BodyProgress {
    pub done: Notify,
    pub bytes: std::sync::atomic::AtomicU64,
}

/// Shared between the body going upstream and the request's accounting.
pub type BodySent = Arc<BodyProgress>;

/// A body sent upstream.
#[derive(Debug)]
pub enum ReqBody {
    Empty,
    Full(Option<Bytes>),
    /// Boxed: inline it made every request 440 bytes instead of 264, and a
    /// request is held (and moved) by each future on its way upstream.
    Client(Box<ClientBody>),
}

/// The client's request body with an idle timeout.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    sent: Option<BodySent>,
    /// Told once the body has been read to its end (the connection may then
    /// be released between requests, see [`crate::keepalive`]).
    probe: Option<Arc<IdleProbe>>,
    /// Bytes read ahead by [`ReqBody::buffer`], sent before the rest.
    ahead: Option<Bytes>,
    /// Trailers read ahead (they end the body).
    trailers: Option<http::HeaderMap>,
    /// `inner` has returned its end.
    inner_done: bool,
}

impl ReqBody {
    /// Wraps a client body. Returns the "body fully sent" signal when the
    /// body is not already known to be empty.
    /// `probe` was told of the body when the request arrived
    /// ([`IdleProbe::body_opened`]) and is told when it ends.
    pub fn client(
        inner: Incoming,
        idle: Duration,
        probe: &Arc<IdleProbe>,
    ) -> (ReqBody, Option<BodySent>) {
        if inner.is_end_stream() {
            return (ReqBody::Empty, None);
        }
        let sent = Arc::new(BodyProgress::default());
        let body = ClientBody {
            inner,
            idle,
            timer: None,
            sent: Some(sent.clone()),
            probe: Some(probe.clone()),
            ahead: None,
            trailers: None,
            inner_done: false,
        };
        (ReqBody::Client(Box::new(body)), Some(sent))
    }

    /// Reads a client body ahead, before an upstream connection is taken:
    /// until it ends or `limit` bytes have come, whichever is first (see
    /// `[[listener]] request_buffer_bytes`). What was read is sent first,
    /// the rest streams as it comes. The idle timeout runs as when
    /// streaming. An error (the idle timeout, the client gone, broken
    /// chunked framing) leaves the body unusable.
    pub async fn buffer(&mut self, limit: usize) -> Result<(), BoxError> {
        let ReqBody::Client(b) = self else {
            return Ok(());
        };
        // Data frames are copied into one buffer once there is more than
        // one: a frame is a slice of hyper's read buffer, and holding many
        // trickled one-byte slices would pin many of those.
        let mut first: Option<Bytes> = None;
        let mut more = bytes::BytesMut::new();
        let mut len = 0;
        while len < limit && b.trailers.is_none() {
            // A Content-Length body known to be complete: no poll for its
            // end (it could cost the connection task another round).
            if b.inner.is_end_stream() {
                b.inner_done = true;
                break;
            }
            let frame = std::future::poll_fn(|cx| b.poll_inner(cx)).await;
            let Some(frame) = frame else {
                b.inner_done = true;
                break;
            };
            match frame?.into_data() {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    len += d.len();
                    match &first {
                        None if more.is_empty() => first = Some(d),
                        _ => {
                            if let Some(f) = first.take() {
                                more.reserve(f.len() + d.len());
                                more.extend_from_slice(&f);
                            }
                            more.extend_from_slice(&d);
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        b.trailers = Some(t);
                    }
                }
            }
        }
        b.ahead = first.or_else(|| (!more.is_empty()).then(|| more.freeze()));
        Ok(())
    }
}

impl ClientBody {
    /// The next frame from the client, under the idle timeout.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = self.timer.as_mut() {
                    t.as_mut().reset(tokio::time::Instant::now() + self.idle);
                }
                if let (Some(d), Some(sent)) = (frame.data_ref(), self.sent.as_ref()) {
                    sent.bytes
                        .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// Nothing more to send: everything read ahead went, and the client's
    /// body ended.
    fn is_end_stream(&self) -> bool {
        self.ahead.is_none()
            && self.trailers.is_none()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self.ahead.as_ref().map_or(0, |d| d.len() as u64);
        // With trailers still to send the length stays open: an exact one
        // would have HTTP/1.1 frame the body with Content-Length, which has
        // no place for them.
        if self.inner_done && self.trailers.is_none() {
            return SizeHint::with_exact(ahead);
        }
        if self.inner_done {
            let mut hint = SizeHint::new();
            hint.set_lower(ahead);
            return hint;
        }
        let rest = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }

    fn finish(&mut self) {
        if let Some(sent) = self.sent.take() {
            sent.done.notify_one();
        }
    }

    /// The body was read to its end (never called for a body cut short).
    fn ended(&mut self) {
        if let Some(p) = self.probe.take() {
            p.body_ended();
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReqBody::Client(b) => {
                if let Some(d) = b.ahead.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(t) = b.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                if !b.inner_done {
                    match b.poll_inner(cx) {
                        Poll::Ready(None) => b.inner_done = true,
                        other => return other,
                    }
                }
                b.finish();
                b.ended();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(d) => d.is_none(),
            ReqBody::Client(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            ReqBody::Client(b) => b.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // A body dropped early (upstream answered before reading it all)
        // still releases whoever waits to start the response timer.
        self.finish();
        if self.inner_done || self.inner.is_end_stream() {
            self.ended();
        }
    }
}

/// The status recorded for a request whose client went away before the
/// response head (nginx's 499): counted as 4xx, never as an upstream failure.
pub const CLIENT_CLOSED: u16 = 499;

/// Everything to account for when a request ends, however it ends.
#[derive(Debug)]
pub struct RequestGuard {
    conn: Arc<ConnActivity>,
    upstream: Option<UpstreamPart>,
    /// Filled only when the access log is on; the box goes to the log
    /// writer as it is.
    access: Option<(crate::access_log::AccessLog, Box<AccessInfo>)>,
}

/// What the access log needs to know about a request, gathered as it goes
/// (the record the log writer formats).
pub type AccessInfo = crate::access_log::Record;

#[derive(Debug)]
struct UpstreamPart {
    metrics: Arc<PoolMetrics>,
    upstream: Arc<Upstream>,
    pooled: Option<Pooled>,
    start: Instant,
    status: u16,
    complete: bool,
    /// The upstream body broke mid-way.
    failed: bool,
}

impl RequestGuard {
    /// Accounts for a request on a client connection. The server counted
    /// its start ([`ConnActivity::request_started`]) when hyper handed it
    /// over; the drop counts its end.
    pub fn new(conn: Arc<ConnActivity>) -> RequestGuard {
        RequestGuard {
            conn,
            upstream: None,
            access: None,
        }
    }

    /// Turns on access logging for this request.
    pub fn set_access(&mut self, log: crate::access_log::AccessLog, info: Box<AccessInfo>) {
        self.access = Some((log, info));
    }

    /// The access record being gathered, when the access log is on.
    #[inline]
    pub fn access(&mut self) -> Option<&mut AccessInfo> {
        self.access.as_mut().map(|(_, a)| &mut **a)
    }

    /// Records that the request is being served by `upstream`: the endpoint
    /// and pool in-flight counts go up now and down on drop.
    pub fn attach_upstream(
        &mut self,
        metrics: Arc<PoolMetrics>,
        upstream: Arc<Upstream>,
        start: Instant,
    ) {
        if let Some(a) = self.access() {
            a.endpoint = Some(upstream.addr);
        }
        upstream.in_flight_inc();
        metrics.in_flight.inc();
        self.upstream = Some(UpstreamPart {
            metrics,
            upstream,
            pooled: None,
            start,
            status: CLIENT_CLOSED,
            complete: false,
            failed: false,
        });
    }

    /// Moves accounting to another endpoint (a retry). The failed attempt
    /// still counts against its endpoint and color: retries must not hide a
    /// dead candidate from the rollback analysis.
    pub fn detach_upstream(&mut self) {
        if let Some(u) = self.upstream.take() {
            u.upstream.in_flight_dec();
            u.metrics.in_flight.dec();
            u.upstream.record_outcome(true);
            u.metrics
                .window
                .record(Instant::now(), true, u.start.elapsed());
        }
    }

    /// The status sent to the client and the connection to return to the
    /// pool once the body has been read to its end.
    pub fn set_response(&mut self, status: u16, pooled: Option<Pooled>) {
        if let Some(a) = self.access() {
            a.status = status;
        }
        if let Some(u) = self.upstream.as_mut() {
            u.status = status;
            u.pooled = pooled;
        }
    }

    /// The socket of cyan's own client, whose answer ended: it goes back
    /// to the pool when the request is accounted for.
    fn pool_raw(&mut self, conn: Option<crate::h1client::RawConn>) {
        if let (Some(conn), Some(u)) = (conn, self.upstream.as_mut()) {
            u.pooled = Some(Pooled::Raw(conn));
        }
    }

    fn body_complete(&mut self) {
        if let Some(u) = self.upstream.as_mut() {
            u.complete = true;
        }
    }

    fn body_failed(&mut self) {
        if let Some(u) = self.upstream.as_mut() {
            if !u.complete {
                u.metrics.count_error(ErrorKind::Reset);
                u.failed = true;
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // One clock read for everything below.
        let now = Instant::now();
        self.conn.request_finished(now);
        if let Some((log, mut a)) = self.access.take() {
            a.bytes_in = a
                .body
                .take()
                .map_or(0, |b| b.bytes.load(std::sync::atomic::Ordering::Relaxed));
            a.duration = now.saturating_duration_since(a.start);
            a.error = a
                .error
                .or(self.upstream.as_ref().filter(|u| u.failed).map(|_| "reset"));
            log.log(a);
        }
        if let Some(u) = self.upstream.take() {
            u.upstream.in_flight_dec();
            u.metrics.in_flight.dec();
            u.metrics.count_status(u.status);
            let elapsed = now.saturating_duration_since(u.start);
            u.metrics.duration.observe(elapsed.as_secs_f64());
            // A client that left before the answer says nothing about the
            // upstream: no health or analysis verdict either way.
            if u.status != CLIENT_CLOSED {
                // 5xx (ours or the upstream's) and broken bodies are
                // failures; 4xx are the client's business and never count.
                let failed = u.status >= 500 || u.failed;
                u.upstream.record_outcome(failed);
                u.metrics.window.record(now, failed, elapsed);
            }
            match u.pooled {
                Some(p) if u.complete => u.upstream.check_in(p),
                // A 101's connection belongs to the tunnel now.
                Some(p) if u.status != 101 => p.abandon(),
                _ => {}
            }
        }
    }
}

/// A body sent to the client.
#[derive(Debug)]
pub struct RespBody {
    inner: RespInner,
    guard: Option<RequestGuard>,
    /// A chunk was just handed over: hyper writes it before it gets the
    /// next (HTTP/1.1; see `poll_frame`).
    flush_first: bool,
}

#[derive(Debug)]
enum RespInner {
    Full(Option<Bytes>),
    Upstream(Incoming),
    /// From cyan's own HTTP/1.1 client ([`crate::h1client`]), with the
    /// head's lines (the response's `HeaderMap` holds only what cyan set).
    Raw(crate::h1client::RawBody, crate::h1client::RawHead),
}

impl RespBody {
    /// A short fixed body.
    pub fn full(data: impl Into<Bytes>, mut guard: Option<RequestGuard>) -> RespBody {
        let data = data.into();
        if let Some(a) = guard.as_mut().and_then(|g| g.access()) {
            a.bytes_out = data.len() as u64;
        }
        RespBody {
            inner: RespInner::Full((!data.is_empty()).then_some(data)),
            guard,
            flush_first: false,
        }
    }

    /// The header lines of a response read by cyan's own client, when this
    /// is its body and they were not taken ([`RespBody::take_raw_head`]).
    pub fn raw_head(&self) -> Option<&crate::h1client::RawHead> {
        match &self.inner {
            RespInner::Raw(_, head) => Some(head),
            _ => None,
        }
    }

    /// Takes the header lines of a response read by cyan's own client (for
    /// hyper's server, which needs them in the response's `HeaderMap`).
    pub fn take_raw_head(&mut self) -> Option<crate::h1client::RawHead> {
        match &mut self.inner {
            RespInner::Raw(_, head) => Some(std::mem::take(head)),
            _ => None,
        }
    }

    /// The upstream's body, streamed.
    pub fn upstream(inner: UpBody, mut guard: RequestGuard) -> RespBody {
        let inner = match inner {
            UpBody::Hyper(b) => RespInner::Upstream(b),
            UpBody::Raw(mut b, head) => {
                if b.is_end_stream() {
                    guard.pool_raw(b.take_conn());
                }
                RespInner::Raw(b, head)
            }
        };
        // hyper never polls a body that is already at its end (204, HEAD):
        // such a response is complete as it stands.
        let done = match &inner {
            RespInner::Upstream(b) => b.is_end_stream(),
            RespInner::Raw(b, _) => b.is_end_stream(),
            RespInner::Full(_) => false,
        };
        if done {
            guard.body_complete();
        }
        RespBody {
            inner,
            guard: Some(guard),
            flush_first: false,
        }
    }

    /// Accounts for a frame polled from an upstream body: bytes for the
    /// access log, a failure, and the end (known from `end` as soon as the
    /// last data frame is out: hyper stops polling an exact-length body
    /// then, and the connection would otherwise never go back to the pool).
    /// `conn` is the socket of cyan's own client, returned with the guard.
    fn relayed(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
        end: bool,
        conn: Option<crate::h1client::RawConn>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(g) = self.guard.as_mut() {
            g.pool_raw(conn);
        }
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                if let Some(g) = self.guard.as_mut() {
                    g.body_failed();
                }
            }
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(a)) =
                    (f.data_ref(), self.guard.as_mut().and_then(|g| g.access()))
                {
                    a.bytes_out += d.len() as u64;
                }
                self.flush_first = self.guard.as_ref().is_some_and(|g| g.conn.holds_bodies());
                if end {
                    if let Some(g) = self.guard.as_mut() {
                        g.body_complete();
                    }
                    self.guard = None;
                }
            }
            _ => {}
        }
        polled
    }

    fn complete(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.body_complete();
        }
        // Account now rather than when hyper drops the body.
        self.guard = None;
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // The guard first: an abandoned upstream connection is marked for a
        // reset before dropping `inner` wakes its task, which on another
        // worker could otherwise close it gracefully first.
        self.guard.take();
        // cyan's own client: a socket whose response was not read to its
        // end cannot be reused; it is reset, not closed gracefully.
        if let RespInner::Raw(b, _) = &mut self.inner {
            b.abandon();
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            RespInner::Full(d) => Poll::Ready(d.take().map(|d| Ok(Frame::data(d)))),
            // The client's socket is full: no more chunks until a write goes
            // through (which wakes this task; see `ConnActivity::body_held`).
            RespInner::Upstream(_) | RespInner::Raw(..)
                if this.guard.as_ref().is_some_and(|g| g.conn.body_held()) =>
            {
                Poll::Pending
            }
            // HTTP/1.1: one Pending after each chunk, so hyper flushes it
            // (and learns whether the socket is full) before it asks for the
            // next. Otherwise, with the upstream's connection task refilling
            // the body on another worker, hyper could queue several chunks
            // before its first write; with the 16 KiB notsent mark the
            // socket then took only the first and 52 KiB stayed held for a
            // client that was not reading (about one run in twenty of
            // `tests/limits.rs`'s stalled download).
            RespInner::Upstream(_) | RespInner::Raw(..) if this.flush_first => {
                this.flush_first = false;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            RespInner::Upstream(b) => {
                let polled = Pin::new(&mut *b)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(BoxError::from)));
                let end = b.is_end_stream();
                this.relayed(polled, end, None)
            }
            RespInner::Raw(b, _) => {
                let polled = Pin::new(&mut *b)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(BoxError::from)));
                let end = b.is_end_stream();
                // At its end the socket goes back to the pool with the guard.
                let conn = (end || matches!(polled, Poll::Ready(None)))
                    .then(|| b.take_conn())
                    .flatten();
                this.relayed(polled, end, conn)
            }
        };
        if let Poll::Ready(None) = polled {
            this.complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RespInner::Full(d) => d.is_none(),
            RespInner::Upstream(b) => b.is_end_stream(),
            RespInner::Raw(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RespInner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            RespInner::Upstream(b) => b.size_hint(),
            RespInner::Raw(b, _) => b.size_hint(),
        }
    }
}
