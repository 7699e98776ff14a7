//! `cyan demo`: two built-in backend pools (blue and green, each answering
//! with its color) and the proxy in front of them, from an embedded config.
//! Works on a fresh machine with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};

/// The embedded demo config; `{listen}`, `{socket}`, `{blue}` and `{green}`
/// are filled in with the proxy address, the admin socket and the demo
/// backends' endpoints.
pub const DEMO_CONFIG: &str = r#"
[runtime]
drain_timeout = "5s"

[admin]
socket = "{socket}"

[metrics]
listen = "127.0.0.1:0"

# One JSON line per request on stdout: which color served and why.
[access_log]
path = "stdout"

[[listener]]
name = "demo"
listen = "{listen}"

[[service]]
name = "gateway"
hosts = ["*"]
path_prefix = "/"
stable = "blue"
candidate_percent = 10.0
sticky = { header = "x-user-id" }
override_header = "x-cyan-color"
color_header = "x-cyan-color"
blue  = { endpoints = [{blue}] }
green = { endpoints = [{green}] }
"#;

/// Builds the demo config for the given proxy address and backends.
pub fn demo_config(
    listen: SocketAddr,
    socket: &std::path::Path,
    blue: &[SocketAddr],
    green: &[SocketAddr],
) -> Result<Config, ConfigError> {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = DEMO_CONFIG
        .replace("{listen}", &listen.to_string())
        .replace("{socket}", &socket.display().to_string())
        .replace("{blue}", &list(blue))
        .replace("{green}", &list(green));
    Config::parse(&text)
}

/// Starts a demo backend on `addr` (port 0 for any) that answers every
/// request with its color; returns the bound address. It stops when `stop`
/// is cancelled.
pub async fn start_backend(
    color: &'static str,
    addr: SocketAddr,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "demo backend accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(backend_response(color, local, &req))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn backend_response(
    color: &str,
    local: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let body = format!(
        "{color} ({local}) answered {} {}\n",
        req.method(),
        req.uri().path()
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        "x-backend",
        http::HeaderValue::from_str(&format!("{color} {local}"))
            .unwrap_or(http::HeaderValue::from_static("demo")),
    );
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The demo's admin socket: private to the user, outside the system paths.
pub fn demo_socket() -> std::path::PathBuf {
    let uid = rustix::process::getuid().as_raw();
    std::env::temp_dir()
        .join(format!("cyan-demo-{uid}"))
        .join("admin.sock")
}

/// What `cyan demo` prints once it is up.
pub fn banner(proxy: SocketAddr, socket: &std::path::Path, metrics: Option<SocketAddr>) -> String {
    let url = format!("http://{proxy}");
    let metrics = metrics.map_or(String::new(), |m| {
        format!("  curl -s http://{m}/metrics | grep ^cyan_requests_total\n")
    });
    let ctl = format!("cargo run --release -- ctl --socket {}", socket.display());
    format!(
        "cyan demo: proxy on {url}  (blue stable, 10% green, sticky on x-user-id)\n\
         \n\
         Try:\n\
         \x20 curl -si {url}/ | grep -i -e x-cyan-color -e answered      # a per-request draw, mostly blue\n\
         \x20 curl -s -H 'x-user-id: alice' {url}/                        # alice always lands on the same color\n\
         \x20 curl -s -H 'x-cyan-color: green' {url}/                     # the override header forces green\n\
         \x20 for i in $(seq 200); do curl -s {url}/ | cut -d' ' -f1; done | sort | uniq -c\n\
         \n\
         Operate it from another terminal:\n\
         \x20 {ctl} status\n\
         \x20 {ctl} split gateway 50 --reason 'half and half'\n\
         \x20 {ctl} promote gateway    # green takes 100% and becomes stable\n\
         \x20 {ctl} events             # who changed what, and why\n\
         \n\
         {metrics}\
         Each request is logged below as one JSON line (color, color_reason).\n\
         \n\
         Ctrl-C stops it.\n"
    )
}

/// Reports what the fault-test backend sees: `recv <id>` as soon as a
/// request's head arrives (before its body is read or anything is
/// answered), `done <id>` when its answer is ready. Only requests carrying
/// `x-test-id` are reported.
#[doc(hidden)]
pub type SeenHook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// The deterministic bytes of the fault-test backend's `/blob/<n>`.
#[doc(hidden)]
pub fn blob(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A backend for fault-injection tests (`cyan test-backend`, hidden; also
/// started in process by the tests). Every answer is checkable by the
/// client:
///
/// | request | answer |
/// | --- | --- |
/// | `POST /upload` | reads the body; 422 unless its XXH3 matches `x-body-digest`; body `"<digest> <len>"` |
/// | `GET /blob/<n>?pause=<ms>` | [`blob`]`(n)` with `x-body-digest`; sends half, pauses, sends the rest |
/// | `/status/<code>` | that status |
/// | anything else | `"<color> <addr>\n"` |
///
/// Each answer's head is held back `delay`, plus `x-delay-ms: N` ms when
/// the request asks.
#[doc(hidden)]
#[derive(Clone)]
pub struct TestBackend {
    pub color: std::sync::Arc<str>,
    pub delay: std::time::Duration,
    pub seen: Option<SeenHook>,
}

impl std::fmt::Debug for TestBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBackend")
            .field("color", &self.color)
            .field("delay", &self.delay)
            .finish()
    }
}

impl TestBackend {
    /// Listens on `addr` (port 0 for any) until `stop`; returns the bound
    /// address.
    pub async fn start(
        self,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(pair) => pair,
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                    _ = stop.cancelled() => break,
                };
                let _ = stream.set_nodelay(true);
                let (me, stop) = (self.clone(), stop.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.answer(local, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(local)
    }
}

impl TestBackend {
    async fn answer(&self, local: SocketAddr, mut req: Request<Incoming>) -> Response<TestBody> {
        use http_body_util::BodyExt;
        let (color, seen) = (&self.color, &self.seen);
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let id = header("x-test-id");
        let report = |what: &str| {
            if let (Some(id), Some(seen)) = (&id, &seen) {
                seen(&format!("{what} {id}"));
            }
        };
        report("recv");
        let delay: u64 = header("x-delay-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let expected = header("x-body-digest");
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let mut status = StatusCode::OK;
        let mut digest = None;
        let body = if req.method() == http::Method::POST && path == "/upload" {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut len = 0u64;
            let mut broken = false;
            while let Some(frame) = req.body_mut().frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            h.update(d);
                            len += d.len() as u64;
                        }
                    }
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            let got = format!("{:016x}", h.digest());
            if broken {
                status = StatusCode::BAD_REQUEST;
            } else if expected.is_some_and(|e| e != got) {
                status = StatusCode::UNPROCESSABLE_ENTITY;
            }
            TestBody::full(format!("{got} {len}"))
        } else if let Some(n) = path.strip_prefix("/blob/") {
            let n: usize = n.parse().unwrap_or(0);
            let pause: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("pause="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let data = Bytes::from(blob(n));
            digest = Some(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data)));
            let rest = data.slice(n / 2..);
            TestBody::Paused {
                first: Some(data.slice(..n / 2)),
                pause: Box::pin(tokio::time::sleep(std::time::Duration::from_millis(pause))),
                rest: Some(rest),
            }
        } else if let Some(code) = path.strip_prefix("/status/") {
            status = code
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            TestBody::full(format!("{color} status\n"))
        } else {
            TestBody::full(format!("{color} {local}\n"))
        };
        let delay = self.delay + std::time::Duration::from_millis(delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        report("done");
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        if let Some(d) = digest.and_then(|d| http::HeaderValue::from_str(&d).ok()) {
            resp.headers_mut().insert("x-body-digest", d);
        }
        resp
    }
}

/// The fault-test backend's bodies: whole, or in two halves with a pause
/// between them (a death in the pause leaves a response cut mid-body).
enum TestBody {
    Full(Option<Bytes>),
    Paused {
        first: Option<Bytes>,
        pause: std::pin::Pin<Box<tokio::time::Sleep>>,
        rest: Option<Bytes>,
    },
}

impl TestBody {
    fn full(s: String) -> TestBody {
        TestBody::Full(Some(Bytes::from(s)))
    }
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        use std::task::Poll;
        let frame = |b: Bytes| Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        match self.get_mut() {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(http_body::Frame::data(b)))),
            TestBody::Paused { first, pause, rest } => {
                if let Some(b) = first.take() {
                    return frame(b);
                }
                if rest.is_none() {
                    return Poll::Ready(None);
                }
                match pause.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => rest.take().map_or(Poll::Ready(None), frame),
                }
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let n = match self {
            TestBody::Full(b) => b.as_ref().map_or(0, |b| b.len()),
            TestBody::Paused { first, rest, .. } => {
                first.as_ref().map_or(0, |b| b.len()) + rest.as_ref().map_or(0, |b| b.len())
            }
        };
        http_body::SizeHint::with_exact(n as u64)
    }
}
