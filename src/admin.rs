//! The admin API: HTTP/1.1 + JSON over a Unix socket (and, optionally, a TCP
//! listener with bearer tokens). It is a security boundary, so:
//!
//! * the socket is created under umask 0177 (mode 0600 from birth, no chmod
//!   race); a stale socket file left by a crash is replaced, a live one (a
//!   running cyan answers on it) is never stolen, and a path that is not a
//!   socket is never deleted;
//! * every Unix peer's uid (SO_PEERCRED) must be in `allowed_uids` (default:
//!   the proxy's own uid and root) and is recorded as the actor of changes;
//! * TCP is loopback unless `allow_remote = true`; tokens are stored as
//!   SHA-256 and compared in constant time; role `read` may only GET;
//! * bodies are capped (413), slow clients time out, and each listener has
//!   its own small connection cap, so admin traffic cannot hurt the data path.
//!
//! ## Endpoints
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/v1/status` | | generation; every service's split and endpoints |
//! | GET | `/v1/services/{name}` | | one service |
//! | PUT | `/v1/services/{name}/split` | `{"candidate_percent": 12.5, "if_generation": 7, "reason": ".."}` | result |
//! | POST | `/v1/services/{name}/promote` | `{"if_generation"?, "reason"?}` (may be empty) | result |
//! | POST | `/v1/services/{name}/rollback` | same | result |
//! | POST | `/v1/services/{name}/endpoints/{addr}/drain` | same | result |
//! | POST | `/v1/services/{name}/endpoints/{addr}/undrain` | same | result |
//! | POST | `/v1/services/{name}/rollout/start` | `{"if_generation"?, "reason"?}` | runs preflight, starts the plan; 422 if preflight fails |
//! | POST | `/v1/services/{name}/rollout/pause`, `/resume`, `/abort` | same | result |
//! | GET | `/v1/services/{name}/rollout` | | the rollout's state and the rollback latch |
//! | GET | `/v1/events?since=N&limit=M` | | audit events with `seq > N` |
//! | POST | `/v1/reload` | | re-reads the config file |
//! | GET | `/v1/table` | | the whole live snapshot |
//!
//! A result is `{"result": "applied" | "no_change", "generation": N,
//! "service": {..}}`. Errors are `{"error": "..", "field": ".."}` with 400
//! (bad JSON or value), 401/403 (auth), 404 (unknown service, endpoint or
//! path), 405 (method), 408 (slow request), 409 (`if_generation` is stale:
//! nothing changed; the body carries `current_generation`), 413 (body too
//! large), 422 (a rollout's preflight failed: nothing moved).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{bp_to_percent, percent_to_bp, AdminConfig, Color, Role, Sticky};
use crate::control::{Controller, RolloutError, RolloutOp};
use crate::split::constant_time_eq;
use crate::table::{Applied, Change, Command, Origin, Service, TableError};

/// Who is asking.
#[derive(Debug, Clone)]
enum Caller {
    /// A Unix socket peer that passed the uid check.
    Peer { uid: u32, pid: Option<i32> },
    /// A TCP client with a valid token.
    Token { name: String, role: Role },
    /// Refused: the status and why.
    Refused(StatusCode, &'static str),
}

impl Caller {
    fn actor(&self) -> String {
        match self {
            Caller::Peer {
                uid,
                pid: Some(pid),
            } => format!("uid:{uid} pid:{pid}"),
            Caller::Peer { uid, pid: None } => format!("uid:{uid}"),
            Caller::Token { name, .. } => format!("token:{name}"),
            Caller::Refused(..) => "refused".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path} is in use by a running process; refusing to take it over")]
    SocketInUse { path: PathBuf },
    #[error("admin socket path {path} exists and is not a socket; refusing to delete it")]
    NotASocket { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin listener {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound admin API, ready to serve.
#[derive(Debug)]
pub struct AdminServer {
    pub socket: Option<PathBuf>,
    pub tcp_addr: Option<SocketAddr>,
    /// Duplicates of the admin sockets, to hand to a successor.
    pub fds: Vec<(String, std::os::fd::OwnedFd)>,
    /// Set once a successor took the sockets over: the socket file is then
    /// theirs and must not be removed.
    pub handed_over: Arc<std::sync::atomic::AtomicBool>,
}

/// Binds the configured admin listeners and serves them until `stop`.
pub async fn start(
    cfg: &AdminConfig,
    ctl: Arc<Controller>,
    stop: CancellationToken,
    inherited: &mut crate::upgrade::Inherited,
) -> Result<AdminServer, AdminError> {
    use std::os::fd::AsFd;
    let cfg = Arc::new(cfg.clone());
    let mut out = AdminServer {
        socket: None,
        tcp_addr: None,
        fds: Vec::new(),
        handed_over: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    if let Some(path) = &cfg.socket {
        let sock_err = |source| AdminError::Socket {
            path: path.clone(),
            source,
        };
        let listener = match inherited.take("admin_unix") {
            Some(fd) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).map_err(sock_err)?;
                UnixListener::from_std(l).map_err(sock_err)?
            }
            None => bind_unix(path)?,
        };
        if let Ok(fd) = listener.as_fd().try_clone_to_owned() {
            out.fds.push(("admin_unix".into(), fd));
        }
        let listener = UnixAdmin {
            listener,
            allowed: allowed_uids(&cfg),
        };
        out.socket = Some(path.clone());
        let path = path.clone();
        let handed_over = out.handed_over.clone();
        spawn_accept_loop(
            listener,
            cfg.clone(),
            ctl.clone(),
            stop.clone(),
            move || {
                // Once handed over, the socket file belongs to the successor.
                if !handed_over.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = std::fs::remove_file(&path);
                }
            },
        );
    }
    if let Some(addr) = cfg.listen {
        let listener = match inherited.take("admin_tcp") {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)
                    .and_then(|_| TcpListener::from_std(l))
                    .map_err(|source| AdminError::Tcp { addr, source })?
            }
            None => TcpListener::bind(addr)
                .await
                .map_err(|source| AdminError::Tcp { addr, source })?,
        };
        if let Ok(fd) = listener.as_fd().try_clone_to_owned() {
            out.fds.push(("admin_tcp".into(), fd));
        }
        out.tcp_addr = listener.local_addr().ok();
        spawn_accept_loop(
            TcpAdmin(listener),
            cfg.clone(),
            ctl.clone(),
            stop.clone(),
            || {},
        );
    }
    Ok(out)
}

/// Decides who is calling, per request of one admin connection.
type Authenticator = Arc<dyn Fn(&Request<Incoming>) -> Caller + Send + Sync>;

/// How an admin listener accepts connections and decides who is calling.
trait AdminAccept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
    /// The authentication of one connection's requests.
    fn caller(&self, stream: &Self::Stream, cfg: &Arc<AdminConfig>) -> Authenticator;
}

/// The Unix socket: the peer's uid (SO_PEERCRED) decides, per connection.
struct UnixAdmin {
    listener: UnixListener,
    allowed: Vec<u32>,
}

impl AdminAccept for UnixAdmin {
    type Stream = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<Self::Stream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    fn caller(&self, stream: &Self::Stream, _: &Arc<AdminConfig>) -> Authenticator {
        let caller = match stream.peer_cred() {
            Ok(c) if self.allowed.contains(&c.uid()) => Caller::Peer {
                uid: c.uid(),
                pid: c.pid(),
            },
            Ok(c) => {
                tracing::warn!(uid = c.uid(), pid = ?c.pid(), "admin socket peer refused: uid not allowed");
                Caller::Refused(
                    StatusCode::FORBIDDEN,
                    "your uid may not use this admin socket",
                )
            }
            Err(_) => Caller::Refused(StatusCode::FORBIDDEN, "peer credentials unavailable"),
        };
        Arc::new(move |_| caller.clone())
    }
}

/// The TCP listener: a bearer token decides, per request.
struct TcpAdmin(TcpListener);

impl AdminAccept for TcpAdmin {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<Self::Stream> {
        self.0.accept().await.map(|(s, _)| s)
    }

    fn caller(&self, _: &Self::Stream, cfg: &Arc<AdminConfig>) -> Authenticator {
        let cfg = cfg.clone();
        Arc::new(move |req| token_caller(&cfg, req))
    }
}

/// Accepts until `stop`, under the listener's own connection cap (over it,
/// connections are closed at once); `on_exit` runs when the loop ends.
fn spawn_accept_loop<L: AdminAccept>(
    listener: L,
    cfg: Arc<AdminConfig>,
    ctl: Arc<Controller>,
    stop: CancellationToken,
    on_exit: impl FnOnce() + Send + 'static,
) {
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(cfg.max_connections));
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::warn!("admin connection cap reached; connection closed");
                continue;
            };
            let auth = listener.caller(&stream, &cfg);
            let (cfg, ctl, stop) = (cfg.clone(), ctl.clone(), stop.clone());
            tokio::spawn(async move {
                // Open admin connections end with the listener: no change can
                // land once the drain has begun.
                tokio::select! {
                    _ = serve_conn(stream, move |req| auth(req), cfg, ctl) => {}
                    _ = stop.cancelled() => {}
                }
                drop(permit);
            });
        }
        on_exit();
    });
}

fn allowed_uids(cfg: &AdminConfig) -> Vec<u32> {
    if cfg.allowed_uids.is_empty() {
        vec![rustix::process::getuid().as_raw(), 0]
    } else {
        cfg.allowed_uids.clone()
    }
}

/// Binds a Unix socket with mode 0600, replacing only a stale socket.
pub(crate) fn bind_unix(path: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::FileTypeExt;
    let sock_err = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(path = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => {
            return Err(AdminError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(sock_err)?;
        }
    }
    // The umask is process-wide: set it only around bind(2).
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    bound.map_err(sock_err)
}

fn token_caller(cfg: &AdminConfig, req: &Request<Incoming>) -> Caller {
    let Some(auth) = req.headers().get(header::AUTHORIZATION) else {
        return Caller::Refused(StatusCode::UNAUTHORIZED, "missing bearer token");
    };
    let Some(token) = auth.as_bytes().strip_prefix(b"Bearer ") else {
        return Caller::Refused(
            StatusCode::UNAUTHORIZED,
            "expected `Authorization: Bearer <token>`",
        );
    };
    let presented = crate::config::sha256(token.trim_ascii());
    // Every token is compared, so timing does not tell which one matched.
    let mut found: Option<&crate::config::AdminToken> = None;
    for t in &cfg.tokens {
        if constant_time_eq(&presented, &t.sha256) {
            found = Some(t);
        }
    }
    match found {
        Some(t) => Caller::Token {
            name: t.name.clone(),
            role: t.role,
        },
        None => Caller::Refused(StatusCode::UNAUTHORIZED, "invalid token"),
    }
}

async fn serve_conn<IO, F>(io: IO, auth: F, cfg: Arc<AdminConfig>, ctl: Arc<Controller>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Request<Incoming>) -> Caller + Send + Sync + 'static,
{
    let auth = Arc::new(auth);
    let timeout = cfg.request_timeout;
    let svc = service_fn(move |req: Request<Incoming>| {
        let (auth, cfg, ctl) = (auth.clone(), cfg.clone(), ctl.clone());
        async move {
            let caller = auth(&req);
            let resp = match tokio::time::timeout(timeout, handle(&ctl, &cfg, caller, req)).await {
                Ok(r) => r,
                Err(_) => error(StatusCode::REQUEST_TIMEOUT, "request took too long", None),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(16 * 1024);
    if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "admin connection ended");
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Resp {
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, msg: &str, field: Option<&str>) -> Resp {
    let mut body = json!({ "error": msg });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    let mut resp = reply(status, body);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// A mutating request's optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeBody {
    if_generation: Option<u64>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitBody {
    candidate_percent: f64,
    if_generation: Option<u64>,
    reason: Option<String>,
}

/// An admin request, decoded and validated: what to do. Pure data, so the
/// decoding can be tested (and fuzzed) without a running proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminOp {
    Status,
    Table,
    Events {
        since: u64,
        limit: usize,
    },
    Reload,
    Service(String),
    RolloutStatus(String),
    /// A table change by an operator.
    Change {
        cmd: Command,
        if_generation: Option<u64>,
        reason: Option<String>,
    },
    Rollout {
        service: String,
        op: RolloutOp,
        if_generation: Option<u64>,
        reason: Option<String>,
    },
}

/// Why a request could not be decoded: the status and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

fn refuse(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        field: field.map(str::to_string),
    }
}

impl AdminOp {
    /// Whether the operation changes anything (role `read` may not).
    pub fn mutating(&self) -> bool {
        matches!(
            self,
            AdminOp::Reload | AdminOp::Change { .. } | AdminOp::Rollout { .. }
        )
    }
}

/// Decodes a request: method, path, query and body into an [`AdminOp`].
pub fn decode(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<AdminOp, Refusal> {
    let path = path.trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let want = |m: Method| -> Result<(), Refusal> {
        if *method == m || (m == Method::GET && *method == Method::HEAD) {
            Ok(())
        } else {
            Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("use {m}"),
                None,
            ))
        }
    };
    match segs.as_slice() {
        ["v1", "status"] => want(Method::GET).map(|_| AdminOp::Status),
        ["v1", "table"] => want(Method::GET).map(|_| AdminOp::Table),
        ["v1", "reload"] => want(Method::POST).map(|_| AdminOp::Reload),
        ["v1", "events"] => {
            want(Method::GET)?;
            let (since, limit) = events_query(query)?;
            Ok(AdminOp::Events { since, limit })
        }
        ["v1", "services", name] => want(Method::GET).map(|_| AdminOp::Service(name.to_string())),
        ["v1", "services", name, "rollout"] => {
            want(Method::GET).map(|_| AdminOp::RolloutStatus(name.to_string()))
        }
        ["v1", "services", name, "split"] => {
            want(Method::PUT)?;
            let b: SplitBody = parse(body)?;
            let bp = percent_to_bp(b.candidate_percent)
                .map_err(|e| refuse(StatusCode::BAD_REQUEST, e, Some("candidate_percent")))?;
            Ok(AdminOp::Change {
                cmd: Command::SetSplit {
                    service: name.to_string(),
                    candidate_bp: bp,
                },
                if_generation: b.if_generation,
                reason: b.reason,
            })
        }
        ["v1", "services", name, action @ ("promote" | "rollback")] => {
            want(Method::POST)?;
            let b = parse_optional(body)?;
            let service = name.to_string();
            let cmd = if *action == "promote" {
                Command::Promote { service }
            } else {
                Command::Rollback { service }
            };
            Ok(AdminOp::Change {
                cmd,
                if_generation: b.if_generation,
                reason: b.reason,
            })
        }
        ["v1", "services", name, "rollout", op @ ("start" | "pause" | "resume" | "abort")] => {
            want(Method::POST)?;
            let b = parse_optional(body)?;
            let op = match *op {
                "start" => RolloutOp::Start,
                "pause" => RolloutOp::Pause,
                "resume" => RolloutOp::Resume,
                _ => RolloutOp::Abort,
            };
            Ok(AdminOp::Rollout {
                service: name.to_string(),
                op,
                if_generation: b.if_generation,
                reason: b.reason,
            })
        }
        ["v1", "services", name, "endpoints", addr, action @ ("drain" | "undrain")] => {
            want(Method::POST)?;
            let addr = addr.parse::<SocketAddr>().map_err(|_| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("`{addr}` is not an IP:PORT address"),
                    Some("address"),
                )
            })?;
            let b = parse_optional(body)?;
            Ok(AdminOp::Change {
                cmd: Command::SetDrained {
                    service: name.to_string(),
                    addr,
                    drained: *action == "drain",
                },
                if_generation: b.if_generation,
                reason: b.reason,
            })
        }
        _ => Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}"),
            None,
        )),
    }
}

fn events_query(query: Option<&str>) -> Result<(u64, usize), Refusal> {
    let mut since = 0u64;
    let mut limit = 1000usize;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => {
                since = v.parse().map_err(|_| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "since must be a number",
                        Some("since"),
                    )
                })?
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            "limit must be a number",
                            Some("limit"),
                        )
                    })?
                    .clamp(1, 10_000)
            }
            _ => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{k}`"),
                    Some(k),
                ))
            }
        }
    }
    Ok((since, limit))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("invalid JSON body: {e}");
        // serde names the offending field in its message; pass it on.
        let field = msg.split('`').nth(1).map(str::to_string);
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: msg,
            field,
        }
    })
}

fn parse_optional(body: &[u8]) -> Result<ChangeBody, Refusal> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        Ok(ChangeBody::default())
    } else {
        parse(body)
    }
}

async fn handle(
    ctl: &Controller,
    cfg: &AdminConfig,
    caller: Caller,
    req: Request<Incoming>,
) -> Resp {
    if let Caller::Refused(status, why) = caller {
        return error(status, why, None);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, cfg.max_body_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return if e.is::<http_body_util::LengthLimitError>() {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over {} bytes", cfg.max_body_bytes),
                    None,
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "could not read the request body",
                    None,
                )
            };
        }
    };
    let op = match decode(&parts.method, parts.uri.path(), parts.uri.query(), &body) {
        Ok(op) => op,
        Err(r) => return error(r.status, &r.message, r.field.as_deref()),
    };
    if op.mutating() {
        if let Caller::Token {
            role: Role::Read, ..
        } = caller
        {
            return error(
                StatusCode::FORBIDDEN,
                "token role `read` may not change anything",
                None,
            );
        }
    }
    execute(ctl, op, &caller.actor()).await
}

/// Carries out a decoded operation.
async fn execute(ctl: &Controller, op: AdminOp, actor: &str) -> Resp {
    match op {
        AdminOp::Status => status(ctl),
        AdminOp::Table => table(ctl),
        AdminOp::Events { since, limit } => {
            let events = ctl.store.events_since(since, limit);
            reply(StatusCode::OK, json!({ "events": events }))
        }
        AdminOp::Reload => match ctl.reload(actor) {
            Ok(generation) => reply(
                StatusCode::OK,
                json!({ "result": "reloaded", "generation": generation }),
            ),
            Err(e) => error(
                StatusCode::BAD_REQUEST,
                &format!("reload rejected, nothing changed: {e}"),
                Some("config"),
            ),
        },
        AdminOp::Service(name) => {
            let t = ctl.table.load();
            match t.service(&name) {
                Some(s) => reply(StatusCode::OK, service_json(s, t.generation)),
                None => no_service(&name),
            }
        }
        AdminOp::RolloutStatus(name) => {
            let t = ctl.table.load();
            let Some(s) = t.service(&name) else {
                return no_service(&name);
            };
            let v = service_json(s, t.generation);
            reply(
                StatusCode::OK,
                json!({
                    "service": &*s.name,
                    "generation": t.generation,
                    "candidate_percent": v["candidate_percent"],
                    "rollout": v["rollout"],
                    "rolled_back": v["rolled_back"],
                    "plan": s.config.rollout.as_ref().map(|p| json!({
                        "steps": p.steps.iter().map(|b| bp_to_percent(*b)).collect::<Vec<_>>(),
                        "hold": crate::config::format_duration(p.hold),
                        "min_requests": p.min_requests,
                        "preflight_checks": p.preflight.len(),
                    })),
                }),
            )
        }
        AdminOp::Change {
            cmd,
            if_generation,
            reason,
        } => {
            let service = cmd.service().to_string();
            let change = Change::new(cmd, Origin::Operator, actor)
                .if_generation(if_generation)
                .reason(reason);
            match ctl.table.apply(change) {
                Ok(applied) => applied_reply(ctl, &service, applied),
                Err(e) => table_error(e),
            }
        }
        AdminOp::Rollout {
            service,
            op,
            if_generation,
            reason,
        } => {
            match ctl
                .rollout(&service, op, actor, if_generation, reason)
                .await
            {
                Ok(applied) => applied_reply(ctl, &service, applied),
                Err(RolloutError::Table(e)) => table_error(e),
                Err(e @ RolloutError::NoPlan(_)) => {
                    error(StatusCode::BAD_REQUEST, &e.to_string(), Some("rollout"))
                }
                Err(e @ RolloutError::Preflight(_)) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &e.to_string(),
                    Some("preflight"),
                ),
            }
        }
    }
}

fn no_service(name: &str) -> Resp {
    error(
        StatusCode::NOT_FOUND,
        &format!("no service named `{name}`"),
        Some("service"),
    )
}

fn applied_reply(ctl: &Controller, service: &str, applied: Applied) -> Resp {
    let (result, generation) = match applied {
        Applied::Changed { generation } => ("applied", generation),
        Applied::NoChange { generation } => ("no_change", generation),
    };
    let t = ctl.table.load();
    let svc = t.service(service).map(|s| service_json(s, t.generation));
    reply(
        StatusCode::OK,
        json!({ "result": result, "generation": generation, "service": svc }),
    )
}

fn table_error(e: TableError) -> Resp {
    match e {
        TableError::StaleGeneration { expected, current } => reply(
            StatusCode::CONFLICT,
            json!({
                "error": format!("stale generation: you sent {expected}, the live table is {current}; nothing changed"),
                "field": "if_generation",
                "current_generation": current,
            }),
        ),
        e @ TableError::UnknownService(_) => {
            error(StatusCode::NOT_FOUND, &e.to_string(), Some("service"))
        }
        e @ TableError::UnknownEndpoint { .. } => {
            error(StatusCode::NOT_FOUND, &e.to_string(), Some("address"))
        }
        TableError::Invalid { field, reason } => {
            error(StatusCode::BAD_REQUEST, &reason, Some(&field))
        }
    }
}

fn status(ctl: &Controller) -> Resp {
    let t = ctl.table.load();
    let services: Vec<Value> = t
        .services
        .iter()
        .map(|s| service_json(s, t.generation))
        .collect();
    reply(
        StatusCode::OK,
        json!({ "generation": t.generation, "version": crate::VERSION, "services": services }),
    )
}

fn table(ctl: &Controller) -> Resp {
    let t = ctl.table.load();
    let services: Vec<Value> = t
        .services
        .iter()
        .map(|s| {
            let mut v = service_json(s, t.generation);
            let c = &s.config;
            v["listeners"] = json!(c.listeners);
            v["override_header"] = json!(c.override_.as_ref().map(|o| o.header.as_str()));
            v["color_header"] = json!(c.color_header.as_ref().map(|h| h.as_str()));
            for color in [Color::Blue, Color::Green] {
                let u = &c.pool(color).upstream;
                v["pools"][color.as_str()]["upstream"] = json!({
                    "protocol": u.protocol,
                    "connect_timeout": crate::config::format_duration(u.connect_timeout),
                    "response_timeout": crate::config::format_duration(u.response_timeout),
                    "idle_timeout": crate::config::format_duration(u.idle_timeout),
                    "max_idle_per_endpoint": u.max_idle_per_endpoint,
                    "read_buffer_bytes": u.read_buffer_bytes,
                    "tls": u.tls.is_some(),
                });
            }
            v
        })
        .collect();
    reply(
        StatusCode::OK,
        json!({ "generation": t.generation, "listeners": t.listener_names, "services": services }),
    )
}

/// A service as the API shows it.
pub fn service_json(s: &Service, generation: u64) -> Value {
    let pool = |c: Color| {
        let p = s.pool(c);
        let endpoints: Vec<Value> = p
            .endpoints
            .iter()
            .map(|e| {
                let state = if e.drained {
                    "drained"
                } else if !e.healthy {
                    "down"
                } else {
                    "up"
                };
                json!({
                    "address": e.addr.to_string(),
                    "state": state,
                    "healthy": e.healthy,
                    "drained": e.drained,
                    "in_flight": e.upstream.in_flight(),
                })
            })
            .collect();
        json!({ "eligible": p.eligible.len(), "endpoints": endpoints })
    };
    let sticky = s.split.sticky.as_ref().map(|st| match st {
        Sticky::Header(h) => format!("header:{h}"),
        Sticky::Cookie(c) => format!("cookie:{c}"),
        Sticky::ClientIp => "client_ip".to_string(),
    });
    json!({
        "name": &*s.name,
        "generation": generation,
        "stable": s.split.stable,
        "candidate": s.split.candidate(),
        "candidate_percent": bp_to_percent(s.split.candidate_bp),
        "hosts": s.config.hosts.iter().map(|h| match h {
            crate::config::HostPattern::Any => "*".to_string(),
            crate::config::HostPattern::Exact(e) => e.clone(),
            crate::config::HostPattern::Suffix(x) => format!("*{x}"),
        }).collect::<Vec<_>>(),
        "path_prefix": s.path_prefix,
        "sticky": sticky,
        "pools": { "blue": pool(Color::Blue), "green": pool(Color::Green) },
        "rollout": s.rollout.as_ref().map(|r| {
            let now = crate::rollout::unix_ms();
            json!({
                "step": r.step,
                "steps": r.steps.iter().map(|b| bp_to_percent(*b)).collect::<Vec<_>>(),
                "percent": bp_to_percent(r.steps[r.step.min(r.steps.len() - 1)]),
                "held_seconds": r.held_ms(now) as f64 / 1000.0,
                "hold_seconds": s.config.rollout.as_ref().map(|p| p.hold.as_secs_f64()),
                "paused": r.paused_at_ms.is_some(),
            })
        }),
        "rolled_back": s.rolled_back.as_ref().map(|l| json!({
            "reason": l.reason,
            "at": humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(l.at_ms)).to_string(),
        })),
    })
}
