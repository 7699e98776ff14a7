//! The per-request flow and the one place errors become statuses.
//!
//! ```text
//! check_request ─► table.snapshot() ─► route (404) ─► read the body ahead (up
//!   to request_buffer_bytes; the table again if it moved meanwhile) ─► route
//!   ─► choose color ─► pick endpoint ─► rewrite head
//!   ─► Upstream::send ─┬─► response (streamed back)
//!                      └─► failed before sending: retry once
//!                          (another endpoint of the same color,
//!                          else the other color), then error
//! ```
//!
//! | failure | status |
//! | --- | --- |
//! | malformed / smuggling-shaped request | 400, 405, 431 (see [`crate::headers`]) |
//! | no service matches | 404 |
//! | no eligible endpoint in the chosen pool | 503 + `Retry-After` |
//! | connect refused / reset, TLS or HTTP handshake failed, exchange broke | 502 |
//! | connect timeout, no response head in `response_timeout` | 504 |
//! | client body idle longer than `body_idle_timeout` | 408 |
//! | client body broken off while read ahead | 400 |

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};

use crate::body::{AccessInfo, BodyIdleTimeout, ReqBody, RequestGuard, RespBody};
use crate::config::{Color, ListenerConfig, Protocol};
use crate::h1client::RawHead;
use crate::headers::{self, Fields, FieldsMut, Reject};
use crate::metrics::{ErrorKind, Metrics};
use crate::server::ConnActivity;
use crate::table::{RoutingTable, Service, Table};
use crate::upstream::{SendFailure, UpstreamError};

/// Statuses cyan answers itself, for the rejection counter.
const OWN_STATUSES: [u16; 8] = [400, 404, 405, 408, 431, 502, 503, 504];

/// A listener and its pre-resolved metric handles.
#[derive(Debug)]
pub struct ListenerCtx {
    /// Index into the config's listeners (the routing table's listener index).
    pub index: usize,
    pub config: ListenerConfig,
    /// `cyan_rejected_requests_total` by [`OWN_STATUSES`] index.
    rejected: [IntCounter; 8],
    pub connections_open: IntGauge,
    pub tls_handshake_errors: IntCounter,
    /// The access log, when `[access_log]` is configured.
    pub access_log: Option<crate::access_log::AccessLog>,
}

impl ListenerCtx {
    pub fn new(
        index: usize,
        config: ListenerConfig,
        metrics: &Metrics,
        access_log: Option<crate::access_log::AccessLog>,
    ) -> ListenerCtx {
        let name = config.name.clone();
        ListenerCtx {
            index,
            rejected: OWN_STATUSES.map(|c| {
                metrics
                    .rejected_requests
                    .with_label_values(&[&name, &c.to_string()])
            }),
            connections_open: metrics.connections_open.with_label_values(&[&name]),
            tls_handshake_errors: metrics.tls_handshake_errors.with_label_values(&[&name]),
            access_log,
            config,
        }
    }

    fn count_rejected(&self, status: StatusCode) {
        if let Some(i) = OWN_STATUSES.iter().position(|&c| c == status.as_u16()) {
            self.rejected[i].inc();
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub struct ConnCtx {
    pub listener: Arc<ListenerCtx>,
    /// The client as cyan sees it (the PROXY header's source when one was
    /// accepted).
    pub peer: SocketAddr,
    /// `peer`'s address as a header value (X-Forwarded-For), made once.
    pub peer_value: HeaderValue,
    pub trusted_peer: bool,
    pub tls: bool,
    pub activity: Arc<ConnActivity>,
    pub stops: crate::server::Stops,
    /// The connection's slot under `max_connections`; an upgraded tunnel
    /// keeps a clone so it stays counted until it closes.
    pub slot: Arc<crate::server::ConnSlot>,
}

/// A request body as a server path hands it over: hyper's, or none (cyan's
/// own HTTP/1.1 path, [`crate::h1server`], takes bodiless requests only;
/// it hands over the head's lines instead, the request's map left empty).
#[derive(Debug)]
pub enum ClientIn {
    Hyper(Incoming),
    Lines(RawHead),
}

/// Handles one request. Never fails: every error is a response.
///
/// Not an `async fn`: the checks and the routing run when it is called,
/// and the future it returns holds only the step that follows (an answer,
/// the forwarding, or a body read ahead first, boxed). As an `async fn`
/// its future kept the request (twice, moved from) and the admission's
/// locals beside the forwarding's future: 5,512 bytes, each one copied as
/// the request's future is boxed (`-Zprint-type-sizes`, callgrind).
pub fn handle<'a>(
    table: &'a Table,
    conn: &'a ConnCtx,
    req: Request<ClientIn>,
) -> impl Future<Output = Response<RespBody>> + Send + 'a {
    use futures_util::future::{ready, Either};
    match admit(table, conn, req) {
        Admitted::Answer(resp) => Either::Left(ready(resp)),
        Admitted::Forward(f) => Either::Right(Either::Left(forward(conn, f))),
        Admitted::ReadAhead(f) => {
            Either::Right(Either::Right(Box::pin(read_ahead(table, conn, f))))
        }
    }
}

/// A request admitted and routed: what forwarding it takes.
struct Forward {
    /// The table it was routed on; `service` indexes its services.
    snapshot: Arc<RoutingTable>,
    service: usize,
    req: Request<ReqBody>,
    /// The headers, when cyan's own server read the request: `req`'s map
    /// is then empty (see [`ClientIn::Lines`]).
    lines: Option<RawHead>,
    body_sent: Option<crate::body::BodySent>,
    guard: RequestGuard,
    start: Instant,
}

/// The forwarding state is boxed: ~520 bytes, it would be copied at each
/// step into the request's future, and held by value it made that future
/// as much larger (callgrind: fewer instructions boxed, the allocation
/// included). An answer is the rare case and is not boxed (it is moved
/// once, into the request's future).
#[allow(clippy::large_enum_variant)]
enum Admitted {
    /// Refused: cyan's own answer.
    Answer(Response<RespBody>),
    Forward(Box<Forward>),
    /// Its body is read ahead first (`request_buffer_bytes`).
    ReadAhead(Box<Forward>),
}

/// Checks and routes a request, without waiting on anything.
fn admit(table: &Table, conn: &ConnCtx, req: Request<ClientIn>) -> Admitted {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let (body, lines) = match body {
        ClientIn::Hyper(b) => (Some(b), None),
        ClientIn::Lines(l) => (None, Some(l)),
    };
    let req = Request::from_parts(parts, body);
    let mut guard = RequestGuard::new(conn.activity.clone());
    if let Some(log) = &conn.listener.access_log {
        guard.set_access(
            log.clone(),
            Box::new(AccessInfo {
                time: std::time::SystemTime::now(),
                start,
                client: conn.peer,
                method: req.method().clone(),
                uri: req.uri().clone(),
                version: req.version(),
                host: match &lines {
                    Some(l) => l.value(&header::HOST),
                    None => req.headers().get(header::HOST).cloned(),
                },
                request_id: None,
                service: None,
                color: None,
                reason: None,
                endpoint: None,
                generation: 0,
                status: crate::body::CLIENT_CLOSED,
                error: None,
                body: None,
                bytes_out: 0,
                bytes_in: 0,
                duration: std::time::Duration::ZERO,
            }),
        );
    }
    let max = conn.listener.config.max_header_bytes;
    let checked = match &lines {
        Some(l) => headers::check_request_with(&req, l, max),
        None => headers::check_request(&req, max),
    };
    let host = match checked {
        Ok(h) => h,
        Err(r) => return Admitted::Answer(reject(conn, r, guard)),
    };
    let snapshot = table.snapshot();
    if let Some(a) = guard.access() {
        a.generation = snapshot.generation;
    }
    let Some(service) = snapshot.route_index(conn.listener.index, host, req.uri().path()) else {
        return Admitted::Answer(reject(conn, NO_ROUTE, guard));
    };
    let (parts, body) = req.into_parts();
    let (body, body_sent) = match body {
        Some(b) => ReqBody::client(
            b,
            conn.listener.config.body_idle_timeout,
            &conn.activity.probe,
        ),
        None => (ReqBody::Empty, None),
    };
    if let Some(a) = guard.access() {
        a.body = body_sent.clone();
    }
    let read_ahead = conn.listener.config.request_buffer_bytes > 0
        && body_sent.is_some()
        && !headers::is_grpc(&parts.headers);
    let f = Box::new(Forward {
        snapshot,
        service,
        req: Request::from_parts(parts, body),
        lines,
        body_sent,
        guard,
        start,
    });
    if read_ahead {
        Admitted::ReadAhead(f)
    } else {
        Admitted::Forward(f)
    }
}

/// Reads a small body (or a body's first bytes) before a color and an
/// endpoint are chosen and an upstream connection is taken: a client
/// trickling its body costs no connect, and the choice is made on the table
/// and the pools' health as they are when the request can go.
async fn read_ahead(table: &Table, conn: &ConnCtx, mut f: Box<Forward>) -> Response<RespBody> {
    let limit = conn.listener.config.request_buffer_bytes;
    if let Err(e) = f.req.body_mut().buffer(limit).await {
        return client_body_error(conn, &e, f.guard);
    }
    let now = table.snapshot();
    if now.generation != f.snapshot.generation {
        // The table moved while the body came: route again on it (the head
        // was checked before).
        if let Some(a) = f.guard.access() {
            a.generation = now.generation;
        }
        let host = headers::request_host(&f.req).unwrap_or("");
        let Some(service) = now.route_index(conn.listener.index, host, f.req.uri().path()) else {
            return reject(conn, NO_ROUTE, f.guard);
        };
        f.snapshot = now;
        f.service = service;
    }
    forward(conn, f).await
}

const NO_ROUTE: Reject = Reject {
    status: StatusCode::NOT_FOUND,
    reason: "no service matches this host and path",
};

fn reject(conn: &ConnCtx, r: Reject, mut guard: RequestGuard) -> Response<RespBody> {
    tracing::debug!(peer = %conn.peer, status = r.status.as_u16(), reason = r.reason, "request refused");
    if let Some(a) = guard.access() {
        a.error = Some(if r.status == StatusCode::NOT_FOUND {
            "no_route"
        } else {
            "rejected"
        });
    }
    conn.listener.count_rejected(r.status);
    let mut resp = text_response(r.status, r.reason, guard);
    if r.status != StatusCode::NOT_FOUND {
        // The connection's framing can no longer be trusted.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn text_response(status: StatusCode, reason: &str, mut guard: RequestGuard) -> Response<RespBody> {
    if let Some(a) = guard.access() {
        a.status = status.as_u16();
    }
    let mut body = String::with_capacity(reason.len() + 16);
    body.push_str(status.as_str());
    body.push(' ');
    body.push_str(reason);
    body.push('\n');
    let mut resp = Response::new(RespBody::full(body, Some(guard)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Not an `async fn`: one stores its arguments twice (as captured and as
/// locals), and this future is part of every request's.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    conn: &'a ConnCtx,
    mut f: Box<Forward>,
) -> impl Future<Output = Response<RespBody>> + Send + 'a {
    async move {
        // Fields are used in place, not destructured: locals would be copies
        // the future holds beside `f`.
        let svc = &f.snapshot.services[f.service];
        if let Some(a) = f.guard.access() {
            a.service = Some(svc.name.clone());
        }
        let (color, reason) = match &f.lines {
            Some(l) => choose(svc, conn, l),
            None => choose(svc, conn, f.req.headers()),
        };
        let pool = svc.pool(color);
        // Every endpoint of the chosen pool out: the other color takes the
        // request when it can (service `fallback`, on by default).
        let picked = match pool.pick(None) {
            Some(i) => Some((color, i)),
            None if svc.config.fallback => svc
                .pool(color.other())
                .pick(None)
                .map(|i| (color.other(), i)),
            None => None,
        };
        if let Some(a) = f.guard.access() {
            a.color = Some(picked.map_or(color, |(c, _)| c));
            a.reason = Some(match picked {
                Some((c, _)) if c != color => "fallback",
                _ => reason.as_str(),
            });
        }
        let Some((color, idx)) = picked else {
            tracing::warn!(service = %svc.name, %color, "no eligible endpoint");
            if let Some(a) = f.guard.access() {
                a.error = Some("no_endpoint");
            }
            let mut resp = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy endpoint",
                f.guard,
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            pool.metrics.count_status(503);
            return resp;
        };

        let client_version = f.req.version();
        let (client_upgrade, host_value, request_id) =
            rewrite_head(svc, conn, &mut f.req, f.lines.as_mut(), &mut f.guard);
        let mut up_req = f.req;

        let mut color = color;
        let mut idx = idx;
        let mut retried = false;
        loop {
            let pool = svc.pool(color);
            let endpoint = &pool.endpoints[idx];
            let protocol = endpoint.upstream.settings.protocol;
            // Lines go on as they are only through cyan's own client; for
            // hyper's they become the map, before the head is shaped for
            // the endpoint's protocol (HTTP/2 takes Host out).
            if f.lines.is_some() && !endpoint.upstream.takes_lines(&up_req) {
                if let Some(l) = f.lines.take() {
                    l.append_to(up_req.headers_mut());
                }
            }
            shape_for_upstream(
                &mut up_req,
                protocol,
                &host_value,
                endpoint.upstream.settings.tls.is_some(),
                f.lines.is_some(),
            );
            f.guard
                .attach_upstream(pool.metrics.clone(), endpoint.upstream.clone(), f.start);
            match endpoint
                .upstream
                .send(up_req, f.lines.as_ref(), f.body_sent.as_ref())
                .await
            {
                Ok((resp, pooled)) => {
                    return respond(
                        svc,
                        color,
                        resp,
                        pooled,
                        f.guard,
                        client_version,
                        client_upgrade,
                        request_id,
                        conn,
                    );
                }
                Err(SendFailure {
                    error,
                    request: Some(r),
                }) if error.before_send() && !retried => {
                    pool.metrics.count_error(error_kind(&error));
                    pool.metrics.retries.inc();
                    tracing::warn!(service = %svc.name, %color, endpoint = %endpoint.addr, error = %error, "retrying on another endpoint");
                    // Same color first, then the other color.
                    let next = match pool.pick(Some(idx)) {
                        Some(i) => Some((color, i)),
                        None => svc
                            .pool(color.other())
                            .pick(None)
                            .map(|i| (color.other(), i)),
                    };
                    let Some((c, i)) = next else {
                        return upstream_error(svc, color, endpoint.addr, &error, f.guard);
                    };
                    f.guard.detach_upstream();
                    up_req = r;
                    color = c;
                    idx = i;
                    retried = true;
                }
                Err(failure) => {
                    pool.metrics.count_error(error_kind(&failure.error));
                    return upstream_error(svc, color, endpoint.addr, &failure.error, f.guard);
                }
            }
        }
    }
}

/// The client's address as cyan believes it, and the color for the request.
fn choose(
    svc: &Service,
    conn: &ConnCtx,
    headers: &impl Fields,
) -> (Color, crate::split::ColorReason) {
    let client_ip = headers::client_ip(headers, conn.peer.ip(), &conn.listener.config);
    svc.split.choose(headers, client_ip)
}

/// The head as it goes upstream: hop-by-hop headers and a secret override
/// header out, forwarding headers and an X-Request-Id in. Returns the
/// client's version, its upgrade (if it asked for one), the Host value, the
/// request id and the request. A function of its own so that what it uses
/// is not kept in the forwarding future while the upstream answers.
fn rewrite_head(
    svc: &Service,
    conn: &ConnCtx,
    req: &mut Request<ReqBody>,
    lines: Option<&mut RawHead>,
    guard: &mut RequestGuard,
) -> (Option<OnUpgrade>, HeaderValue, HeaderValue) {
    let (client_upgrade, host_value, request_id) = match lines {
        Some(l) => rewrite_fields(svc, conn, req, l),
        None => {
            let mut map = std::mem::take(req.headers_mut());
            let r = rewrite_fields(svc, conn, req, &mut map);
            *req.headers_mut() = map;
            r
        }
    };
    if let Some(a) = guard.access() {
        a.request_id = Some(request_id.clone());
    }
    *req.extensions_mut() = http::Extensions::new();
    (client_upgrade, host_value, request_id)
}

/// [`rewrite_head`] on the headers, wherever they are held.
fn rewrite_fields(
    svc: &Service,
    conn: &ConnCtx,
    req: &mut Request<ReqBody>,
    headers: &mut impl FieldsMut,
) -> (Option<OnUpgrade>, HeaderValue, HeaderValue) {
    let upgrade = headers::is_upgrade_request(headers, req.version());
    let client_upgrade = if upgrade {
        req.extensions_mut().remove::<OnUpgrade>()
    } else {
        None
    };
    let host_value = match headers.value(&header::HOST) {
        Some(h) => h,
        None => req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| HeaderValue::from_static("")),
    };
    headers.strip(upgrade);
    if let Some(ov) = &svc.split.override_ {
        if ov.secret.is_some() {
            headers.remove(&ov.header);
        }
    }
    headers::set_forwarding_with(
        headers,
        &conn.peer_value,
        conn.trusted_peer,
        conn.tls,
        Some(&host_value).filter(|h| !h.is_empty()),
    );
    let request_id = headers::ensure_request_id(headers);
    (client_upgrade, host_value, request_id)
}

/// A client body that failed while cyan read it ahead (no upstream was
/// involved): idle → 408, anything else (the client went away, broken
/// chunked framing) → 400. Both close the connection.
fn client_body_error(
    conn: &ConnCtx,
    error: &crate::body::BoxError,
    mut guard: RequestGuard,
) -> Response<RespBody> {
    let (status, reason, kind) = if error.is::<BodyIdleTimeout>() {
        (
            StatusCode::REQUEST_TIMEOUT,
            "request body timed out",
            "body_timeout",
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            "request body broken off",
            "client_body",
        )
    };
    tracing::debug!(peer = %conn.peer, status = status.as_u16(), error = %error, "request body failed");
    if let Some(a) = guard.access() {
        a.error = Some(kind);
    }
    conn.listener.count_rejected(status);
    let mut resp = text_response(status, reason, guard);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Sets the URI form, version and Host for the endpoint's protocol.
/// `lines`: the headers are held as lines (which always carry a Host),
/// the map left empty.
fn shape_for_upstream(
    req: &mut Request<ReqBody>,
    protocol: Protocol,
    host: &HeaderValue,
    tls: bool,
    lines: bool,
) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    match protocol {
        Protocol::Http1 => {
            if req.uri().scheme().is_some() {
                if let Ok(u) = Uri::try_from(path) {
                    *req.uri_mut() = u;
                }
            }
            *req.version_mut() = Version::HTTP_11;
            if !lines && !req.headers().contains_key(header::HOST) && !host.is_empty() {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
        Protocol::H2 | Protocol::H2c => {
            let scheme = if tls { "https" } else { "http" };
            let authority = host.to_str().unwrap_or("");
            let uri = format!("{scheme}://{authority}{path}");
            if let Ok(u) = Uri::try_from(uri) {
                *req.uri_mut() = u;
            }
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn respond(
    svc: &Service,
    color: Color,
    resp: Response<crate::upstream::UpBody>,
    pooled: Option<crate::upstream::Pooled>,
    mut guard: RequestGuard,
    client_version: Version,
    client_upgrade: Option<OnUpgrade>,
    request_id: HeaderValue,
    conn: &ConnCtx,
) -> Response<RespBody> {
    let (mut parts, mut body) = resp.into_parts();
    // A response from cyan's own client comes as its head's lines, the map
    // empty: what is checked below is checked on them, and what cyan sets
    // is set on them (`RawHead::set`), replacing lines of the same name.
    // No map is made for it on cyan's own HTTP/1.1 server path.
    // A response framed two ways (RFC 9112 §6.3) is a smuggling attempt or a
    // broken upstream: nothing of it reaches the client and its connection
    // is not reused (stopped at once, nothing more of it read).
    let framed_twice = match &body {
        crate::upstream::UpBody::Raw(_, raw) => raw.framed_twice,
        crate::upstream::UpBody::Hyper(_) => {
            parts.headers.contains_key(header::TRANSFER_ENCODING)
                && parts.headers.contains_key(header::CONTENT_LENGTH)
        }
    };
    if framed_twice {
        drop(body);
        if let Some(p) = pooled {
            p.abandon();
        }
        tracing::warn!(service = %svc.name, %color, "upstream response has both Content-Length and Transfer-Encoding");
        if let Some(a) = guard.access() {
            a.error = Some("bad_response");
        }
        guard.set_response(502, None);
        return text_response(
            StatusCode::BAD_GATEWAY,
            "upstream sent an ambiguous response",
            guard,
        );
    }
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        match (client_upgrade, parts.extensions.remove::<OnUpgrade>()) {
            (Some(client), Some(upstream)) => {
                let hard = conn.stops.hard.clone();
                let name = svc.name.clone();
                let slot = conn.slot.clone();
                conn.stops.tracker.spawn(async move {
                    tokio::select! {
                        _ = tunnel(client, upstream, name) => {}
                        _ = hard.cancelled() => {}
                    }
                    drop(slot);
                });
            }
            _ => {
                // A 101 nobody asked for cannot be relayed.
                tracing::warn!(service = %svc.name, %color, "upstream switched protocols unasked");
                return text_response(
                    StatusCode::BAD_GATEWAY,
                    "unexpected 101 from upstream",
                    guard,
                );
            }
        }
    }
    parts.version = client_version;
    parts.extensions = http::Extensions::new();
    match &mut body {
        crate::upstream::UpBody::Raw(_, raw) => {
            // Hop-by-hop lines were marked out when the head was read.
            if let Some(h) = &svc.color_header {
                raw.set(h.clone(), HeaderValue::from_static(color.as_str()));
            }
            // An echoed id goes on (kept out of HPACK's table when a map is
            // made of the lines, `RawHead::append_to`).
            if raw.get(b"x-request-id").is_none() {
                raw.set(headers::X_REQUEST_ID.clone(), request_id);
            }
        }
        crate::upstream::UpBody::Hyper(_) => {
            headers::strip_hop_by_hop(&mut parts.headers, switching);
            if let Some(h) = &svc.color_header {
                parts
                    .headers
                    .insert(h.clone(), HeaderValue::from_static(color.as_str()));
            }
            match parts.headers.get_mut(&headers::X_REQUEST_ID) {
                Some(echoed) => headers::never_indexed(echoed),
                None => {
                    parts.headers.insert(&headers::X_REQUEST_ID, request_id);
                }
            }
        }
    }
    guard.set_response(parts.status.as_u16(), pooled);
    Response::from_parts(parts, RespBody::upstream(body, guard))
}

/// A response for hyper's server: the header lines of an answer read by
/// cyan's own client (kept as lines for cyan's own HTTP/1.1 server,
/// [`crate::h1server::write_response`]) go into its `HeaderMap`.
pub fn for_hyper(mut resp: Response<RespBody>) -> Response<RespBody> {
    if let Some(raw) = resp.body_mut().take_raw_head() {
        raw.append_to(resp.headers_mut());
    }
    resp
}

async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, service: Arc<str>) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(%service, error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(%service, up, down, "tunnel closed"),
        Err(e) => tracing::debug!(%service, error = %e, "tunnel ended with an error"),
    }
}

fn error_kind(e: &UpstreamError) -> ErrorKind {
    match e {
        UpstreamError::Connect { .. } | UpstreamError::Handshake { .. } => ErrorKind::Connect,
        UpstreamError::ConnectTimeout { .. } | UpstreamError::ResponseTimeout { .. } => {
            ErrorKind::Timeout
        }
        UpstreamError::Exchange { .. } => ErrorKind::Reset,
    }
}

/// Whether an exchange failed because the client's body went idle.
fn client_body_timed_out(e: &UpstreamError) -> bool {
    let UpstreamError::Exchange { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**source);
    while let Some(err) = cur {
        if err.is::<BodyIdleTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn upstream_error(
    svc: &Service,
    color: Color,
    addr: SocketAddr,
    error: &UpstreamError,
    mut guard: RequestGuard,
) -> Response<RespBody> {
    let (status, reason) = if client_body_timed_out(error) {
        (StatusCode::REQUEST_TIMEOUT, "request body timed out")
    } else {
        match error {
            UpstreamError::ConnectTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out")
            }
            UpstreamError::ResponseTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream response timed out")
            }
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream connect failed")
            }
            UpstreamError::Exchange { .. } => (StatusCode::BAD_GATEWAY, "upstream exchange failed"),
        }
    };
    tracing::warn!(service = %svc.name, %color, endpoint = %addr, status = status.as_u16(), error = %error, "upstream error");
    guard.set_response(status.as_u16(), None);
    if let Some(a) = guard.access() {
        a.error = Some(if status == StatusCode::REQUEST_TIMEOUT {
            "body_timeout"
        } else {
            error_kind(error).as_str()
        });
    }
    let mut resp = text_response(status, reason, guard);
    if status == StatusCode::REQUEST_TIMEOUT {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
