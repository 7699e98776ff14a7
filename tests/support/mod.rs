//! Shared helpers for end-to-end tests: in-process blue/green backends on
//! port 0, a proxy started from a config template, HTTP clients, and an
//! `eventually` helper. No fixed ports, nothing outside the process.
#![allow(dead_code)]

pub mod extended;
pub mod faults;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::Xxh3;

use cyan::config::Config;
use cyan::server::Server;

/// The cyan executable the process-level tests start (`cyan run`, `cyan ctl`,
/// `cyan test-backend`): `CYAN_BIN` when it is set, else the one cargo built
/// for this test run. The override runs those tests against another build of
/// the same source, such as the PGO + BOLT binary that `deploy/build-release.sh`
/// makes, which cargo cannot build itself. A `CYAN_BIN` that is not a file is
/// an error, not a quiet fallback to cargo's binary; an empty one counts as
/// unset. A relative path is taken from the test's working directory, which
/// under `cargo test` is the package root.
pub fn cyan_exe() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    match std::env::var_os("CYAN_BIN") {
        Some(bin) if !bin.is_empty() => {
            let bin = PathBuf::from(bin);
            let executable = std::fs::metadata(&bin)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            assert!(
                executable,
                "CYAN_BIN={} is not an executable file (unset it to test cargo's own binary)",
                bin.display()
            );
            // Absolute, so a test that changes directory still finds it.
            std::fs::canonicalize(&bin).expect("CYAN_BIN: canonicalize")
        }
        _ => PathBuf::from(env!("CARGO_BIN_EXE_cyan")),
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Header carrying the XXH3-64 digest (hex) of a request body; the backend
/// answers 422 when the body it received does not match.
pub const DIGEST: &str = "x-body-digest";

pub fn digest_hex(data: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(data))
}

/// A test backend. Routes by path:
///
/// | path | answer |
/// | --- | --- |
/// | `/echo-headers` | the request head as `name: value` lines |
/// | `/upload` | streams the body through XXH3; 422 if `x-body-digest` differs; body `"<digest> <len>"` |
/// | `/delay/<ms>` | waits, then 200 |
/// | `/status/<code>` | that status |
/// | `/probe` | `probe_status` if set, else 200 (a health check path that fails alone) |
/// | `/trailers` | body `"ok"` + trailers `grpc-status: 0`, `x-request-trailer` echoing the request's |
/// | `/big/<n>` | `n` bytes, streamed in 64 KiB chunks |
/// | `/ws` | WebSocket echo (HTTP/1.1 upgrade) |
/// | `/half/<n>` | promises `n` bytes, sends half, then resets the connection |
/// | anything else | `"<color> <addr>"` |
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub color: &'static str,
    pub hits: Arc<AtomicUsize>,
    /// When non-zero, every request is answered with this status.
    pub force_status: Arc<AtomicU16>,
    /// When non-zero, `/probe` is answered with this status.
    pub probe_status: Arc<AtomicU16>,
    /// Requests currently being handled.
    pub in_flight: Arc<AtomicU64>,
    /// Completed TLS handshakes (TLS backends only).
    pub tls_handshakes: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(color: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::serve(color, listener)
    }

    pub fn serve(color: &'static str, listener: TcpListener) -> Backend {
        Backend::serve_with(color, listener, None)
    }

    /// A backend behind TLS (ALPN `h2` and `http/1.1`) with `cert`.
    pub async fn start_tls(color: &'static str, cert: &TestCert) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::serve_tls(color, listener, cert)
    }

    pub fn serve_tls(color: &'static str, listener: TcpListener, cert: &TestCert) -> Backend {
        cyan::tls::install_provider();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key_path).expect("key");
        let mut cfg = rustls::ServerConfig::builder_with_provider(cyan::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der.clone()], key)
            .expect("backend cert");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Backend::serve_with(color, listener, Some(acceptor))
    }

    fn serve_with(
        color: &'static str,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Backend {
        let addr = listener.local_addr().expect("local addr");
        let b = Backend {
            addr,
            color,
            hits: Arc::new(AtomicUsize::new(0)),
            force_status: Arc::new(AtomicU16::new(0)),
            probe_status: Arc::new(AtomicU16::new(0)),
            in_flight: Arc::new(AtomicU64::new(0)),
            tls_handshakes: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let me = b.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                    _ = me.stop.cancelled() => break,
                };
                let me = me.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => me.serve_conn(stream).await,
                        Some(acceptor) => {
                            let accept = acceptor.accept(stream);
                            if let Ok(Ok(s)) =
                                tokio::time::timeout(Duration::from_secs(5), accept).await
                            {
                                me.tls_handshakes.fetch_add(1, Ordering::SeqCst);
                                me.serve_conn(s).await;
                            }
                        }
                    }
                });
            }
        });
        b
    }

    async fn serve_conn<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stop = self.stop.clone();
        let me = self;
        let svc = service_fn(move |req| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::select! {
            _ = conn => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Stops accepting and drops open connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<BoxBody> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let resp = self.route(&mut req).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        resp
    }

    async fn route(&self, req: &mut Request<Incoming>) -> Response<BoxBody> {
        let forced = self.force_status.load(Ordering::SeqCst);
        if forced != 0 {
            return text(forced, format!("{} forced {forced}\n", self.color));
        }
        let path = req.uri().path().to_string();
        if path == "/probe" {
            let status = match self.probe_status.load(Ordering::SeqCst) {
                0 => 200,
                s => s,
            };
            return text(status, format!("{} probe\n", self.color));
        }
        if path == "/echo-headers" {
            let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<bin>")));
            }
            return text(200, out);
        }
        if path == "/upload" {
            let expected = req
                .headers()
                .get(DIGEST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut h = Xxh3::new();
            let mut len = 0u64;
            let body = req.body_mut();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            h.update(d);
                            len += d.len() as u64;
                        }
                    }
                    Err(e) => return text(400, format!("body error: {e}\n")),
                }
            }
            let got = format!("{:016x}", h.digest());
            if expected.is_some_and(|e| e != got) {
                return text(422, format!("digest mismatch: got {got}\n"));
            }
            return text(200, format!("{got} {len}"));
        }
        if let Some(ms) = path.strip_prefix("/delay/") {
            let ms: u64 = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return text(200, format!("{} {} delayed {ms}\n", self.color, self.addr));
        }
        if let Some(n) = path.strip_prefix("/fat-head/") {
            // A response head of about `n` bytes: one long header.
            let n: usize = n.parse().unwrap_or(0);
            let mut resp = text(200, format!("{} fat head\n", self.color));
            let value = HeaderValue::from_str(&"h".repeat(n)).expect("header value");
            resp.headers_mut().insert("x-fat", value);
            return resp;
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return text(
                code.parse().unwrap_or(500),
                format!("{} status\n", self.color),
            );
        }
        if path == "/trailers" {
            let mut request_trailer = String::new();
            let body = req.body_mut();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(t) = f.trailers_ref() {
                    if let Some(v) = t.get("x-request-trailer") {
                        request_trailer = v.to_str().unwrap_or("").to_string();
                    }
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert(
                "x-request-trailer",
                HeaderValue::from_str(&request_trailer).unwrap_or(HeaderValue::from_static("")),
            );
            let frames = vec![
                Frame::data(Bytes::from_static(b"ok")),
                Frame::trailers(trailers),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(
                frames.into_iter().map(Ok::<_, BoxError>),
            ));
            let mut resp = Response::new(BodyExt::boxed(body));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            return resp;
        }
        if let Some(n) = path.strip_prefix("/big/") {
            let n: u64 = n.parse().unwrap_or(0);
            return Response::new(BodyExt::boxed(Generated::new(n)));
        }
        if let Some(n) = path.strip_prefix("/half/") {
            let n: u64 = n.parse().unwrap_or(1024);
            let body = HalfThenFail {
                sent: false,
                len: n / 2,
                pause: Box::pin(tokio::time::sleep(Duration::from_millis(50))),
            };
            let mut resp = Response::new(BodyExt::boxed(body));
            resp.headers_mut().insert(
                "content-length",
                HeaderValue::from_str(&n.to_string()).unwrap(),
            );
            return resp;
        }
        if path == "/ws" {
            return websocket_echo(req);
        }
        text(200, format!("{} {}\n", self.color, self.addr))
    }
}

fn text(status: u16, body: String) -> Response<BoxBody> {
    let mut resp = Response::new(BodyExt::boxed(
        Full::new(Bytes::from(body)).map_err(|e: Infallible| -> BoxError { match e {} }),
    ));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<BoxBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return text(400, "not a websocket request\n".into());
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        // A Close is answered by tungstenite on the next read, which then
        // ends the stream: the client sees a clean closing handshake.
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                continue;
            }
            if ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = text(101, String::new());
    let h = resp.headers_mut();
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).unwrap(),
    );
    *resp.body_mut() =
        BodyExt::boxed(Empty::new().map_err(|e: Infallible| -> BoxError { match e {} }));
    resp
}

/// A body of `n` deterministic bytes produced on the fly (flat memory).
pub struct Generated {
    left: u64,
    offset: u64,
}

impl Generated {
    pub fn new(n: u64) -> Generated {
        Generated { left: n, offset: 0 }
    }

    /// The byte at a position: cheap and not constant, so a shifted or
    /// dropped chunk changes the digest.
    pub fn byte(i: u64) -> u8 {
        (i.wrapping_mul(2_654_435_761) >> 13) as u8
    }

    /// The digest of the whole stream, computed without holding it.
    pub fn digest(n: u64) -> String {
        let mut h = Xxh3::new();
        let mut g = Generated::new(n);
        while let Some(c) = g.next_chunk() {
            h.update(&c);
        }
        format!("{:016x}", h.digest())
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(64 * 1024);
        let chunk: Vec<u8> = (self.offset..self.offset + n)
            .map(Generated::byte)
            .collect();
        self.left -= n;
        self.offset += n;
        Some(Bytes::from(chunk))
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.next_chunk().map(|c| Ok(Frame::data(c))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// Sends half of a promised body, then (after a pause, so the head and the
/// first half are surely on the wire) fails: the connection is reset.
struct HalfThenFail {
    sent: bool,
    len: u64,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl Body for HalfThenFail {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.sent {
            self.sent = true;
            let len = self.len as usize;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; len])))));
        }
        match self.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err("backend gave up mid-body".into()))),
        }
    }
}

/// Fills a config template: `{blue}` / `{green}` become endpoint lists.
pub fn config(template: &str, blue: &[&Backend], green: &[&Backend]) -> Config {
    let list = |b: &[&Backend]| {
        b.iter()
            .map(|b| format!("\"{}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = template
        .replace("{blue}", &list(blue))
        .replace("{green}", &list(green));
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// The usual single-service config; `extra` is appended to the service.
pub fn service_config(percent: f64, extra: &str) -> String {
    format!(
        r#"
[runtime]
drain_timeout = "5s"

[[listener]]
name = "public"
listen = "127.0.0.1:0"
trusted_proxies = ["10.0.0.0/8"]

[[service]]
name = "gateway"
candidate_percent = {percent}
{extra}
blue  = {{ endpoints = [{{blue}}] }}
green = {{ endpoints = [{{green}}] }}
"#
    )
}

pub async fn start_proxy(cfg: &Config) -> (Server, SocketAddr) {
    let server = Server::start(cfg).await.expect("proxy starts");
    let addr = server.local_addr("public").expect("public listener");
    (server, addr)
}

/// A pooled HTTP/1.1 client.
pub fn h1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn empty() -> BoxBody {
    BodyExt::boxed(Empty::new().map_err(|e: Infallible| -> BoxError { match e {} }))
}

pub fn full(data: impl Into<Bytes>) -> BoxBody {
    BodyExt::boxed(Full::new(data.into()).map_err(|e: Infallible| -> BoxError { match e {} }))
}

/// GET `path` on the proxy with extra headers; returns status, headers, body.
pub async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody>,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut b = Request::get(format!("http://{proxy}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(empty()).unwrap())
        .await
        .expect("request reaches the proxy");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The color in a default backend answer.
pub fn color_of(body: &str) -> &str {
    body.split(' ').next().unwrap_or("")
}

/// Sends raw bytes on a fresh connection and returns everything the proxy
/// writes back before closing (or until `wait` passes).
pub async fn raw_exchange(proxy: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `check` until it is true or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut check: F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An address with nothing listening (bound once, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A metric's value from the proxy's registry (sum over series whose labels
/// contain every `label="value"` given).
pub fn metric(server: &Server, name: &str, labels: &[&str]) -> f64 {
    server
        .metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------
// Configs beyond the usual single service.
// ---------------------------------------------------------------------------

/// A one-listener, one-service config. `listener` and `service` are extra
/// lines for those sections; `blue` / `green` are extra keys inside the pool
/// inline tables (e.g. `protocol = "h2c"`), with a leading comma.
pub fn custom_config(
    percent: f64,
    listener: &str,
    service: &str,
    blue: &str,
    green: &str,
) -> String {
    format!(
        r#"
[runtime]
drain_timeout = "2s"

[[listener]]
name = "public"
listen = "127.0.0.1:0"
{listener}

[[service]]
name = "gateway"
candidate_percent = {percent}
{service}
blue  = {{ endpoints = [{{blue}}]{blue} }}
green = {{ endpoints = [{{green}}]{green} }}
"#
    )
}

// ---------------------------------------------------------------------------
// TLS material and clients.
// ---------------------------------------------------------------------------

/// A directory under the system temp dir, unique to this process and call,
/// removed on drop (declared first in a test, it outlives the instance
/// whose state and socket it holds). Derefs to its `Path`.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "cyan-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate written as PEM files.
#[derive(Debug, Clone)]
pub struct TestCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    /// Generates a self-signed certificate for `names` into `dir/stem.{pem,key}`.
    pub fn generate(dir: &Path, stem: &str, names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
        std::fs::write(&key_path, ck.signing_key.serialize_pem()).expect("write key");
        TestCert {
            cert_path,
            key_path,
            der: ck.cert.der().clone(),
        }
    }

    /// `{ cert = "...", key = "..." }` for a config.
    pub fn toml_pair(&self) -> String {
        format!(
            "cert = \"{}\", key = \"{}\"",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

/// A rustls client trusting `roots`, offering `alpn`, limited to `versions`.
pub fn tls_connector(
    roots: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(cyan::tls::provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A rustls client that accepts any certificate (to look at which one the
/// server chose), offering `http/1.1`.
pub fn tls_connector_any() -> tokio_rustls::TlsConnector {
    let provider = cyan::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` over TLS with SNI `name`.
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls_pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

// ---------------------------------------------------------------------------
// One-connection HTTP clients over any stream (hyper's low-level API).
// ---------------------------------------------------------------------------

/// Sends one request over a fresh HTTP/1.1 connection on `io`.
pub async fn h1_send<IO>(io: IO, req: Request<BoxBody>) -> Result<Response<Incoming>, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req).await
}

/// Sends one request over a fresh HTTP/2 connection on `io`.
pub async fn h2_send<IO>(io: IO, req: Request<BoxBody>) -> Result<Response<Incoming>, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req).await
}

/// Reads a whole response body as text.
pub async fn body_text(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

// ---------------------------------------------------------------------------
// Raw sockets.
// ---------------------------------------------------------------------------

/// What a raw exchange saw.
#[derive(Debug)]
pub struct RawOutcome {
    pub text: String,
    /// The peer closed the connection (EOF or reset) within the wait.
    pub closed: bool,
    /// From the end of the write to EOF (or to the end of the wait).
    pub elapsed: Duration,
}

/// Writes `bytes` on `s`, then reads until the peer closes or `wait` passes.
pub async fn exchange_on(
    s: &mut tokio::net::TcpStream,
    bytes: &[u8],
    wait: Duration,
) -> RawOutcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !bytes.is_empty() {
        s.write_all(bytes).await.expect("write");
    }
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, s.read_to_end(&mut out))
        .await
        .is_ok();
    RawOutcome {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
        elapsed: start.elapsed(),
    }
}

/// [`exchange_on`] a fresh connection.
pub async fn raw_outcome(proxy: SocketAddr, bytes: &[u8], wait: Duration) -> RawOutcome {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    exchange_on(&mut s, bytes, wait).await
}

/// Reads one HTTP/1.1 response (head + Content-Length body) from `s`,
/// leaving the connection open. `None` on EOF/timeout before a whole one.
pub async fn read_one_response(s: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    read_responses(s, 1, wait).await.pop()
}

/// Reads up to `n` whole responses (Content-Length framed; pipelined ones
/// included) from `s`, leaving the connection open. Fewer on EOF/timeout.
pub async fn read_responses(
    s: &mut tokio::net::TcpStream,
    n: usize,
    wait: Duration,
) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if buf.len() < end + 4 + len || out.len() == n {
                break;
            }
            out.push(String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned());
            buf.drain(..end + 4 + len);
        }
        if out.len() >= n {
            return out;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

// ---------------------------------------------------------------------------
// Memory.
// ---------------------------------------------------------------------------

/// The process's resident set size in bytes (`VmRSS`).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples RSS every 10 ms on a plain thread; [`RssPeak::finish`] gives the
/// highest value seen.
pub struct RssPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssPeak {
    pub fn start() -> RssPeak {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = rss_bytes();
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(rss_bytes());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss_bytes())
        });
        RssPeak { stop, thread }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0)
    }
}

/// Serializes tests whose memory or CPU measurements other tests of the same
/// binary would disturb.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Time the current runtime's workers spent busy (not parked).
pub fn runtime_busy() -> Duration {
    let m = tokio::runtime::Handle::current().metrics();
    (0..m.num_workers())
        .map(|w| m.worker_total_busy_duration(w))
        .sum()
}

// ---------------------------------------------------------------------------
// Certificates with a chosen expiry, Prometheus text, one-shot HTTP.
// ---------------------------------------------------------------------------

impl TestCert {
    /// Like [`TestCert::generate`] (fresh key), with `notAfter` set to
    /// midnight UTC of `year-month-day`; also returns that as Unix seconds.
    pub fn generate_expiring(
        dir: &Path,
        stem: &str,
        names: &[&str],
        (year, month, day): (i32, u8, u8),
    ) -> (TestCert, i64) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = rcgen::KeyPair::generate().expect("key pair");
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let not_after = params.not_after.unix_timestamp();
        let cert = params.self_signed(&key).expect("self-signed");
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        let tc = TestCert {
            cert_path,
            key_path,
            der: cert.der().clone(),
        };
        (tc, not_after)
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments are
/// skipped; label values must not contain `,` or `}` — none of cyan's do).
/// Panics on a line it cannot read, so a malformed exposition fails a test.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Default::default()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in: {line}"));
                let mut labels = std::collections::BTreeMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in: {line}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label in: {line}"));
                    labels.insert(k.to_string(), v.to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The samples named `name` whose labels include every `(key, value)`.
pub fn samples<'a>(all: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    all.iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The value of the one sample named `name` with `labels`; panics when there
/// is none or more than one.
pub fn sample_value(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(all, name, labels);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {name}{labels:?}, found {found:?}"
    );
    found[0].value
}

/// `GET path` on a fresh connection with `Connection: close`; returns the
/// status and body, or the connection error (e.g. refused).
pub async fn http_get_once(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Starts a whole cyan instance from config text; returns it and the address
/// of its `public` listener.
pub async fn start_app(text: &str) -> (cyan::app::App, SocketAddr) {
    let cfg = Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let app = cyan::app::App::start(cfg, None, false)
        .await
        .expect("app starts");
    let addr = app.server.local_addr("public").expect("public listener");
    (app, addr)
}

/// `cyan run --config CONFIG [FLAG]` as a child process, killed on drop:
/// logs at warn and no `NOTIFY_SOCKET` unless `env` (applied last) says
/// otherwise; stdout discarded, stderr to `stderr`. Does not wait for it.
pub fn spawn_cyan_run(
    config: &Path,
    flag: Option<&str>,
    env: &[(&str, &std::ffi::OsStr)],
    stderr: std::process::Stdio,
) -> tokio::process::Child {
    tokio::process::Command::new(cyan_exe())
        .args(["run", "--config"])
        .arg(config)
        .args(flag)
        .env("CYAN_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("cyan starts")
}

/// A whole-instance config: admin socket `dir/admin.sock`, state in
/// `dir/state`, metrics on an ephemeral port, one listener `public` and one
/// service `gateway`. `admin_extra` goes into `[admin]`; `service_inline`
/// into the service before its pools, `service_tables` after them.
pub fn app_config(
    dir: &std::path::Path,
    percent: f64,
    blue: &[&Backend],
    green: &[&Backend],
    admin_extra: &str,
    service_inline: &str,
    service_tables: &str,
) -> String {
    let list = |b: &[&Backend]| {
        b.iter()
            .map(|b| format!("\"{}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[runtime]
drain_timeout = "5s"

[metrics]
listen = "127.0.0.1:0"

[admin]
socket = "{sock}"
{admin_extra}

[state]
dir = "{state}"

[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
candidate_percent = {percent}
{service_inline}
blue  = {{ endpoints = [{blue}] }}
green = {{ endpoints = [{green}] }}
{service_tables}
"#,
        sock = dir.join("admin.sock").display(),
        state = dir.join("state").display(),
        blue = list(blue),
        green = list(green),
    )
}

/// Background load: `workers` loops of GET `path` until stopped; `stop`
/// returns the counts of 2xx, 3xx/4xx, 5xx and broken exchanges
/// (transport errors, timeouts, truncated bodies).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    c4: Arc<AtomicUsize>,
    c5: Arc<AtomicUsize>,
    broken: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(proxy: std::net::SocketAddr, workers: usize, path: &'static str) -> Load {
        let l = Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
            c4: Arc::new(AtomicUsize::new(0)),
            c5: Arc::new(AtomicUsize::new(0)),
            broken: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
        };
        let mut l = l;
        for _ in 0..workers {
            let (stop, ok, c4, c5, broken) = (
                l.stop.clone(),
                l.ok.clone(),
                l.c4.clone(),
                l.c5.clone(),
                l.broken.clone(),
            );
            l.tasks.push(tokio::spawn(async move {
                let client = h1_client();
                while !stop.load(Ordering::SeqCst) {
                    let req = http::Request::get(format!("http://{proxy}{path}"))
                        .body(empty())
                        .unwrap();
                    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                        Ok(Ok(r)) => {
                            let s = r.status().as_u16();
                            let body = http_body_util::BodyExt::collect(r.into_body()).await;
                            match (s, body.is_ok()) {
                                (_, false) => broken.fetch_add(1, Ordering::SeqCst),
                                (200..=299, _) => ok.fetch_add(1, Ordering::SeqCst),
                                (300..=499, _) => c4.fetch_add(1, Ordering::SeqCst),
                                _ => c5.fetch_add(1, Ordering::SeqCst),
                            };
                        }
                        _ => {
                            broken.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
        l
    }

    pub async fn stop(self) -> (usize, usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.c4.load(Ordering::SeqCst),
            self.c5.load(Ordering::SeqCst),
            self.broken.load(Ordering::SeqCst),
        )
    }
}

pub fn candidate_bp(app: &cyan::app::App) -> u16 {
    app.server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .split
        .candidate_bp
}

/// A TCP connection to `proxy` with a 4 KiB receive buffer and an Ethernet
/// MSS, so the proxy's writes to it fill the socket at once (loopback's
/// 64 KiB MSS would make the proxy's send buffer autotune to megabytes).
pub async fn small_window_connect(proxy: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_tcp_mss(1460)?;
    sock.set_recv_buffer_size(4096)?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    sock.connect(proxy).await
}

/// An IPv4 TCP socket's row in `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRow {
    pub local_port: u16,
    pub remote_port: u16,
    /// The kernel's state number (1 established, 4 FIN_WAIT1, 6 TIME_WAIT,
    /// 10 LISTEN, ...).
    pub state: u8,
    /// Bytes written and not yet acknowledged by the peer.
    pub tx_queue: u64,
    /// Bytes received and not yet read.
    pub rx_queue: u64,
}

pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_LISTEN: u8 = 10;

/// Every IPv4 TCP socket the kernel has (none if the table is unreadable).
pub fn tcp_rows() -> Vec<TcpRow> {
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    let hex = |v: &str| u64::from_str_radix(v, 16).ok();
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, queues) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(4)?);
            let (tx, rx) = queues.split_once(':')?;
            Some(TcpRow {
                local_port: port(local)?,
                remote_port: port(remote)?,
                state: u8::from_str_radix(state, 16).ok()?,
                tx_queue: hex(tx)?,
                rx_queue: hex(rx)?,
            })
        })
        .collect()
}
