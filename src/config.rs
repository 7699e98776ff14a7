//! Configuration in two stages: raw serde types that mirror the TOML file
//! (unknown keys are errors), then [`Config`], the validated runtime form.
//!
//! Validation collects *every* problem instead of stopping at the first, each
//! naming the key it is about (`service[gateway].candidate_percent`), so
//! `cyan check` can list them all at once. The annotated example in
//! `config/cyan.example.toml` is the operator's reference; a test parses it.
//!
//! Durations are strings with a unit: `"250ms"`, `"10s"`, `"5m"`, `"1h"`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The two pools of every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    /// The other color.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// Index into `[blue, green]` arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    /// Parses `blue` / `green`, ASCII case-insensitively.
    pub fn from_bytes(b: &[u8]) -> Option<Color> {
        if b.eq_ignore_ascii_case(b"blue") {
            Some(Color::Blue)
        } else if b.eq_ignore_ascii_case(b"green") {
            Some(Color::Green)
        } else {
            None
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Raw types: exactly the file's shape.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    admin: Option<RawAdmin>,
    state: Option<RawState>,
    metrics: Option<RawMetrics>,
    access_log: Option<RawAccessLog>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    allowed_uids: Option<Vec<u32>>,
    listen: Option<String>,
    #[serde(default)]
    allow_remote: bool,
    #[serde(default)]
    tokens: Vec<RawToken>,
    max_connections: Option<usize>,
    max_body_bytes: Option<usize>,
    request_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    role: Role,
    sha256: Option<String>,
    file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<usize>,
    drain_timeout: Option<String>,
    upgrade_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    listen: String,
    tls: Option<RawListenerTls>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    proxy_protocol: bool,
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    handshake_timeout: Option<String>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    send_timeout: Option<String>,
    h2_max_concurrent_streams: Option<u32>,
    notsent_lowat_bytes: Option<u32>,
    request_buffer_bytes: Option<u32>,
    fast_http1: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    sni_certs: Vec<RawCertPair>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertPair {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    hosts: Option<Vec<String>>,
    path_prefix: Option<String>,
    listeners: Option<Vec<String>>,
    stable: Option<Color>,
    candidate_percent: Option<f64>,
    sticky: Option<RawSticky>,
    salt: Option<String>,
    override_header: Option<String>,
    override_secret: Option<String>,
    color_header: Option<String>,
    #[serde(default)]
    upstream: RawUpstream,
    health: Option<RawHealth>,
    rollback: Option<RawRollback>,
    rollout: Option<RawRollout>,
    fallback: Option<bool>,
    blue: RawPool,
    green: RawPool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    method: Option<String>,
    host: Option<String>,
    expect: Option<Vec<u16>>,
    interval: Option<String>,
    jitter: Option<f64>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    eject_after: Option<u32>,
    eject_for: Option<String>,
    eject_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollback {
    enabled: Option<bool>,
    bucket: Option<String>,
    evaluate_every: Option<String>,
    min_requests: Option<u64>,
    max_failure_ratio: Option<f64>,
    relative_margin: Option<f64>,
    latency_factor: Option<f64>,
    latency_floor: Option<String>,
    consecutive: Option<u32>,
    min_healthy_fraction: Option<f64>,
    step_down: Option<Vec<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    steps: Option<Vec<f64>>,
    ramp_step: Option<f64>,
    hold: Option<String>,
    min_requests: Option<u64>,
    #[serde(default)]
    preflight: Vec<RawPreflight>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreflight {
    method: Option<String>,
    path: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    body: Option<String>,
    expect: Option<Vec<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSticky {
    header: Option<String>,
    cookie: Option<String>,
    client_ip: Option<bool>,
}

/// Upstream settings; on a service they are defaults for both pools, on a pool
/// they override the service's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    protocol: Option<Protocol>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_idle_per_endpoint: Option<usize>,
    read_buffer_bytes: Option<usize>,
    fast_http1: Option<bool>,
    tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    endpoints: Vec<String>,
    protocol: Option<Protocol>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_idle_per_endpoint: Option<usize>,
    read_buffer_bytes: Option<usize>,
    fast_http1: Option<bool>,
    tls: Option<RawUpstreamTls>,
    health: Option<RawHealth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<PathBuf>,
    server_name: Option<String>,
}

// ---------------------------------------------------------------------------
// Validated types.
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub runtime: RuntimeConfig,
    pub listeners: Vec<ListenerConfig>,
    pub services: Vec<ServiceConfig>,
    /// `[admin]`; `None` = no admin API.
    pub admin: Option<AdminConfig>,
    /// `[state] dir`; `None` = nothing persisted, no audit file.
    pub state_dir: Option<PathBuf>,
    /// `[metrics] listen`: 127.0.0.1:9900 unless configured; `None` when set
    /// to "off".
    pub metrics_listen: Option<SocketAddr>,
    /// `[access_log] path`; `None` = no access log.
    pub access_log: Option<crate::access_log::Target>,
}

/// An admin role: `read` sees, `operate` also changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Operate,
}

/// A bearer token for the TCP admin listener, stored hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

/// `[admin]`: the operator API.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Unix socket path (mode 0600).
    pub socket: Option<PathBuf>,
    /// Peer uids allowed on the socket; empty = the proxy's own uid and root.
    pub allowed_uids: Vec<u32>,
    /// Optional TCP listener (bearer tokens).
    pub listen: Option<SocketAddr>,
    pub tokens: Vec<AdminToken>,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

/// `[runtime]`: process-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Tokio worker threads; `None` = one per core.
    pub worker_threads: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Where a successor asks for the listening sockets (`cyan run
    /// --upgrade`); `None` = binary upgrades are off.
    pub upgrade_socket: Option<PathBuf>,
}

/// `[[listener]]`: one bound socket with its client-side limits.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<ListenerTls>,
    /// Peers whose X-Forwarded-For / PROXY header is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Expect a PROXY protocol v1/v2 header from trusted peers.
    pub proxy_protocol: bool,
    pub max_connections: usize,
    /// Cap on the request head (request line + headers); larger heads get 431.
    pub max_header_bytes: usize,
    /// TLS handshake and PROXY header.
    pub handshake_timeout: Duration,
    /// The request head must arrive within this (hyper's header timer). It
    /// also runs while an HTTP/1.1 keep-alive connection waits for its next
    /// request, so HTTP/1.1 idles at most `min(header_timeout, idle_timeout)`.
    pub header_timeout: Duration,
    /// No request in flight for this long closes the connection (HTTP/2:
    /// GOAWAY).
    pub idle_timeout: Duration,
    /// A request body that delivers nothing for this long fails with 408.
    pub body_idle_timeout: Duration,
    /// A write to the client that makes no progress for this long (the
    /// client stopped reading) closes the connection.
    pub send_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// `TCP_NOTSENT_LOWAT` on client sockets: at most about this many bytes
    /// wait unsent in a client socket's send queue. Default 16384
    /// ([`defaults::NOTSENT_LOWAT_BYTES`]); `0` in the file (`None` here)
    /// keeps the kernel's setting (`net.ipv4.tcp_notsent_lowat`, unlimited
    /// unless changed).
    ///
    /// On by default since 2026-11-22 (it was opt-in): unset, the queue of
    /// a client that stopped reading grew to ~100 KiB of kernel memory, all
    /// of it taken from the upstream first, and each such client cost a
    /// single worker ~0.4 ms of copying that every other connection's
    /// request queued behind: in the extended tier's slow-reader attack the
    /// control p99 was 0.42 ms unset against 0.34 ms at 16384 (medians of
    /// 7 alternating runs each). The price is one fast bulk download on
    /// one core, ~20 % slower on loopback (more wake-ups per byte); both
    /// measured in `benches/README.md`, "Clients that stop reading".
    pub notsent_lowat_bytes: Option<u32>,
    /// How much of a request body cyan reads from the client before it
    /// takes an upstream connection: the whole body when it ends within
    /// this many bytes, else this much, sent first and the rest streamed.
    /// Default 16384 ([`defaults::REQUEST_BUFFER_BYTES`]); `0` streams
    /// every body from its first byte, as before. gRPC requests
    /// (`content-type: application/grpc…`) always stream: their bodies are
    /// message streams a server may answer before they end. The color and
    /// endpoint are chosen once the read-ahead is done, on the table of
    /// that moment.
    ///
    /// The same idea as nginx's `proxy_request_buffering` and HAProxy's
    /// `option http-buffer-request`. Without it a client trickling a body
    /// cost an upstream connection (a connect, a pool slot, a write per
    /// trickled byte) from its first byte: 1,000 of them arriving in a
    /// second took the one worker ~100–250 µs each, and the extended
    /// tier's slow-body row failed 2 of 5 runs alone. A complete small body
    /// also reaches the upstream in one write, and a request that fails at
    /// connect is retried with it. The memory it holds is bounded by
    /// `max_connections` (HTTP/2: times the streams) times this.
    pub request_buffer_bytes: usize,
    /// HTTP/1.1 clients: bodiless GET and HEAD whose head comes whole are
    /// read and answered by cyan's own code ([`crate::h1server`]) instead
    /// of hyper's server; any other request goes to hyper as before. On by
    /// default; `false` sends every request through hyper.
    pub fast_http1: bool,
}

impl ListenerConfig {
    /// Whether `ip` is one of the listener's trusted proxies.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) compare as IPv4.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// PEM certificate chain and key files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// More certificates, each chosen when the client's SNI matches one of its
    /// DNS names; `cert` serves clients whose SNI matches none.
    pub sni_certs: Vec<(PathBuf, PathBuf)>,
}

/// How a service's requests are keyed for sticky routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
}

/// A Host pattern, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// The override header that forces a color.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideConfig {
    pub header: HeaderName,
    /// When set, the header must read `<color>:<secret>`.
    pub secret: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    /// Listener names this service is served on; empty = every listener.
    pub listeners: Vec<String>,
    pub stable: Color,
    /// Candidate share in basis points (0..=10000).
    pub candidate_bp: u16,
    pub sticky: Option<Sticky>,
    pub salt: String,
    pub override_: Option<OverrideConfig>,
    /// Response header naming the color that served, when set.
    pub color_header: Option<HeaderName>,
    /// When every endpoint of the chosen pool is out, the other color takes
    /// the request (if it has an eligible endpoint).
    pub fallback: bool,
    pub rollback: RollbackConfig,
    pub rollout: Option<RolloutConfig>,
    pub blue: PoolConfig,
    pub green: PoolConfig,
}

impl ServiceConfig {
    pub fn pool(&self, color: Color) -> &PoolConfig {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub endpoints: Vec<SocketAddr>,
    pub upstream: UpstreamSettings,
    pub health: HealthConfig,
}

/// Active and passive health checks of a pool's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Active HTTP probes; `None` when no `path` is configured.
    pub active: Option<ActiveCheck>,
    /// Consecutive failures (connect errors, 5xx, timeouts; never 4xx) that
    /// eject an endpoint; 0 turns passive ejection off.
    pub eject_after: u32,
    /// First ejection's length; doubles on each repeat, up to `eject_max`.
    pub eject_for: Duration,
    pub eject_max: Duration,
}

/// One probe: a fresh connection, one request, an expected status.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveCheck {
    pub method: http::Method,
    pub path: String,
    /// Host header; the endpoint's address when absent.
    pub host: Option<String>,
    /// Statuses that count as healthy; empty = 200..=399.
    pub expect: Vec<u16>,
    pub interval: Duration,
    /// Fraction of the interval added or removed at random (0..0.5).
    pub jitter: f64,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// When the candidate is judged bad and traffic goes back to the stable color.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackConfig {
    pub enabled: bool,
    /// Window bucket; the window spans 10 of them.
    pub bucket: Duration,
    pub evaluate_every: Duration,
    /// Candidate requests in the window below which the verdict is
    /// "inconclusive: hold".
    pub min_requests: u64,
    /// Candidate failure ratio that trips on its own.
    pub max_failure_ratio: f64,
    /// The candidate's Wilson lower bound must exceed the stable's upper
    /// bound by this much to trip the relative trigger.
    pub relative_margin: f64,
    /// Candidate p99 above `latency_factor` × stable p99 (and above the
    /// floor) trips the latency trigger; 0 turns it off.
    pub latency_factor: f64,
    pub latency_floor: Duration,
    /// Consecutive bad evaluations needed.
    pub consecutive: u32,
    /// The candidate pool counts as unhealthy below this fraction of its
    /// endpoints up.
    pub min_healthy_fraction: f64,
    /// Shares (basis points) to step down through instead of 0 at once.
    pub step_down: Vec<u16>,
}

/// A progressive rollout plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Candidate shares in basis points, rising, ending at 10000.
    pub steps: Vec<u16>,
    /// How long a step holds clean before it advances: a bad analysis or a
    /// candidate endpoint going down restarts it (see `rollout`).
    pub hold: Duration,
    /// Candidate requests a step must have seen before it may advance.
    pub min_requests: u64,
    pub preflight: Vec<Preflight>,
}

/// A request sent to every candidate endpoint before a rollout starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Preflight {
    pub method: http::Method,
    pub path: String,
    pub headers: Vec<(HeaderName, http::HeaderValue)>,
    pub body: Option<String>,
    /// Expected statuses; empty = 200..=299.
    pub expect: Vec<u16>,
}

/// The protocol cyan speaks to a pool's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (over TLS when `tls` is set).
    Http1,
    /// HTTP/2 over TLS (ALPN `h2`); needs `tls`.
    H2,
    /// HTTP/2 over cleartext TCP, prior knowledge.
    H2c,
}

/// How cyan talks to one pool's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    /// From the request being sent to the response head arriving.
    pub response_timeout: Duration,
    /// Idle pooled connections older than this are closed.
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// HTTP/1.1 upstreams: the largest single read from the connection, so
    /// the largest body chunk cyan holds. A client that stops reading pins
    /// about three chunks (one read ahead, one in the body channel, one in
    /// its write queue), so this bounds a stalled download's memory and the
    /// work one burst of it costs the event loop. It is also the largest
    /// response head accepted (a larger one is a 502). HTTP/2 upstreams are
    /// bounded by their flow-control windows instead.
    pub read_buffer_bytes: usize,
    /// Plaintext HTTP/1.1 endpoints: bodiless GET and HEAD go out on cyan's
    /// own client ([`crate::h1client`]) instead of hyper's. On by default;
    /// `false` sends every request through hyper (a switch to fall back on,
    /// should cyan's client ever misread an endpoint).
    pub fast_http1: bool,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM bundle of trusted CAs; the system's roots when absent.
    pub ca: Option<PathBuf>,
    /// SNI and verified name; the endpoint's IP when absent.
    pub server_name: Option<String>,
}

/// Defaults, in one place so the example file and the code agree.
pub mod defaults {
    use std::time::Duration;
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
    /// `[[listener]] notsent_lowat_bytes` (see `ListenerConfig`).
    pub const NOTSENT_LOWAT_BYTES: u32 = 16 * 1024;
    /// `[[listener]] request_buffer_bytes` (see `ListenerConfig`).
    pub const REQUEST_BUFFER_BYTES: u32 = 16 * 1024;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_IDLE_PER_ENDPOINT: usize = 256;
    /// HAProxy's `tune.bufsize`. Measured (benches/README.md, "Upstream read
    /// buffer"): 1,000 stalled downloads cost the control traffic's p99
    /// 1.6-1.9x its baseline with it and 1.9-2.4x with hyper's adaptive
    /// default (up to 400 KiB), and pin 115 against 179 KiB each (75 since
    /// the body is also held while the client's socket is full); one fast
    /// 1 GiB download runs at ~1 GB/s against ~2 GB/s. Bulk-download
    /// services can raise it per service or pool.
    pub const READ_BUFFER_BYTES: usize = 16 * 1024;
    /// hyper's floor for an HTTP/1 read buffer.
    pub const MIN_READ_BUFFER_BYTES: usize = 8 * 1024;
    pub const MAX_READ_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    pub const METRICS_LISTEN: std::net::SocketAddr =
        std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9900);
}

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

/// One thing wrong with a config, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "invalid config {}:", p.display())?,
            None => write!(f, "invalid config:")?,
        }
        for p in &self.problems {
            if p.key.is_empty() {
                write!(f, "\n  - {}", p.message)?;
            } else {
                write!(f, "\n  - {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: String, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => {
                    self.push(key, "must be greater than zero");
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.push(key, e);
                    default
                }
            },
        }
    }
}

/// Parses `"250ms"`, `"10s"`, `"1.5s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m or h, e.g. \"500ms\")"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. \"500ms\", \"10s\", \"5m\")"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "`{s}` has unknown unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way the config spells it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Converts a percentage with at most two decimals to basis points.
pub fn percent_to_bp(p: f64) -> Result<u16, String> {
    if !p.is_finite() || !(0.0..=100.0).contains(&p) {
        return Err(format!("{p} is out of range 0..100"));
    }
    let scaled = p * 100.0;
    let bp = scaled.round();
    if (scaled - bp).abs() > 1e-6 {
        return Err(format!("{p} has more than two decimals"));
    }
    Ok(bp as u16)
}

/// Basis points as a percentage.
pub fn bp_to_percent(bp: u16) -> f64 {
    f64::from(bp) / 100.0
}

// ---------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------

impl Config {
    /// Reads and validates a config file. Relative paths inside it (certs)
    /// are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            problems: vec![Problem {
                key: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse_with_base(&text, base).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parses and validates config text; relative paths resolve against the
    /// current directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_base(text, Path::new("."))
    }

    fn parse_with_base(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: None,
            problems: vec![Problem {
                key: String::new(),
                message: e.to_string().trim_end().replace('\n', "\n    "),
            }],
        })?;
        validate(raw, base)
    }
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    if raw.runtime.worker_threads == Some(0) {
        p.push(
            "runtime.worker_threads",
            "must be at least 1 (omit it for one per core)",
        );
    }
    let runtime = RuntimeConfig {
        worker_threads: raw.runtime.worker_threads.filter(|n| *n > 0),
        drain_timeout: p.duration(
            "runtime.drain_timeout".into(),
            raw.runtime.drain_timeout.as_deref(),
            defaults::DRAIN_TIMEOUT,
        ),
        upgrade_socket: raw.runtime.upgrade_socket.map(|p| resolve(base, p)),
    };

    if raw.listeners.is_empty() {
        p.push("listener", "at least one [[listener]] is required");
    }
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let key = if l.name.is_empty() {
            format!("listener[{i}]")
        } else {
            format!("listener[{}]", l.name)
        };
        if let Some(cfg) = validate_listener(l, &key, base, &mut p) {
            listeners.push(cfg);
        }
    }
    for (i, a) in listeners.iter().enumerate() {
        for b in &listeners[..i] {
            if a.name == b.name {
                p.push(
                    format!("listener[{}].name", a.name),
                    "duplicate listener name",
                );
            }
            if a.listen == b.listen {
                p.push(
                    format!("listener[{}].listen", a.name),
                    format!("{} is already used by listener `{}`", a.listen, b.name),
                );
            }
        }
    }

    if raw.services.is_empty() {
        p.push("service", "at least one [[service]] is required");
    }
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        let key = if s.name.is_empty() {
            format!("service[{i}]")
        } else {
            format!("service[{}]", s.name)
        };
        if let Some(cfg) = validate_service(s, &key, base, &listeners, &mut p) {
            services.push(cfg);
        }
    }
    for (i, a) in services.iter().enumerate() {
        if services[..i].iter().any(|b| b.name == a.name) {
            p.push(
                format!("service[{}].name", a.name),
                "duplicate service name",
            );
        }
        for b in &services[..i] {
            let same_listener = a.listeners.is_empty()
                || b.listeners.is_empty()
                || a.listeners.iter().any(|l| b.listeners.contains(l));
            if same_listener
                && a.path_prefix == b.path_prefix
                && a.hosts.iter().any(|h| b.hosts.contains(h))
            {
                p.push(
                    format!("service[{}].hosts", a.name),
                    format!(
                        "same host and path_prefix `{}` as service `{}`: one of them could never match",
                        a.path_prefix, b.name
                    ),
                );
            }
        }
    }

    let admin = raw.admin.map(|a| validate_admin(a, base, &mut p));
    if let Some(Some(a)) = &admin {
        if a.socket.is_none() && a.listen.is_none() {
            p.push("admin", "set socket = \"...\" and/or listen = \"IP:PORT\"");
        }
    }
    // On by default on loopback; `listen = "off"` turns it off.
    let metrics_listen = match raw.metrics.as_ref().map(|m| m.listen.as_str()) {
        None => Some(defaults::METRICS_LISTEN),
        Some("off") => None,
        Some(l) => match l.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(
                    "metrics.listen",
                    format!("`{l}` is not an IP:PORT address (or \"off\")"),
                );
                None
            }
        },
    };
    let state_dir = raw.state.map(|s| resolve(base, s.dir));
    let access_log = raw.access_log.map(|a| match a.path.as_str() {
        "stdout" | "-" => crate::access_log::Target::Stdout,
        p => crate::access_log::Target::File(resolve(base, PathBuf::from(p))),
    });

    if p.0.is_empty() {
        Ok(Config {
            runtime,
            listeners,
            services,
            admin: admin.flatten(),
            state_dir,
            metrics_listen,
            access_log,
        })
    } else {
        Err(ConfigError {
            file: None,
            problems: p.0,
        })
    }
}

fn validate_admin(a: RawAdmin, base: &Path, p: &mut Problems) -> Option<AdminConfig> {
    let listen = a.listen.as_deref().and_then(|l| match l.parse::<SocketAddr>() {
        Ok(addr) => {
            if !addr.ip().is_loopback() && !a.allow_remote {
                p.push(
                    "admin.listen",
                    format!("{addr} is not a loopback address; set allow_remote = true to expose the admin API"),
                );
            }
            Some(addr)
        }
        Err(_) => {
            p.push("admin.listen", format!("`{l}` is not an IP:PORT address"));
            None
        }
    });
    if listen.is_some() && a.tokens.is_empty() {
        p.push(
            "admin.tokens",
            "the TCP admin listener needs at least one token",
        );
    }
    let mut tokens = Vec::new();
    for (i, t) in a.tokens.into_iter().enumerate() {
        let key = format!("admin.tokens[{i}]");
        if t.name.is_empty() {
            p.push(format!("{key}.name"), "must not be empty");
        }
        if tokens.iter().any(|o: &AdminToken| o.name == t.name) {
            p.push(
                format!("{key}.name"),
                format!("duplicate token name `{}`", t.name),
            );
        }
        let hash = match (t.sha256, t.file) {
            (Some(hex), None) => match parse_sha256_hex(&hex) {
                Some(h) => Some(h),
                None => {
                    p.push(
                        format!("{key}.sha256"),
                        "must be 64 hex characters (sha256sum of the token)",
                    );
                    None
                }
            },
            (None, Some(file)) => {
                let file = resolve(base, file);
                match std::fs::read_to_string(&file) {
                    Ok(tok) if !tok.trim().is_empty() => Some(sha256(tok.trim().as_bytes())),
                    Ok(_) => {
                        p.push(
                            format!("{key}.file"),
                            format!("{} is empty", file.display()),
                        );
                        None
                    }
                    Err(e) => {
                        p.push(
                            format!("{key}.file"),
                            format!("cannot read {}: {e}", file.display()),
                        );
                        None
                    }
                }
            }
            _ => {
                p.push(
                    key.clone(),
                    "set exactly one of sha256 = \"<hex>\" or file = \"<path>\"",
                );
                None
            }
        };
        if let Some(sha256) = hash {
            tokens.push(AdminToken {
                name: t.name,
                role: t.role,
                sha256,
            });
        }
    }
    let max_connections = a.max_connections.unwrap_or(16);
    if max_connections == 0 {
        p.push("admin.max_connections", "must be at least 1");
    }
    let max_body_bytes = a.max_body_bytes.unwrap_or(64 * 1024);
    if !(256..=16 * 1024 * 1024).contains(&max_body_bytes) {
        p.push("admin.max_body_bytes", "must be in 256..=16777216");
    }
    Some(AdminConfig {
        socket: a.socket.map(|s| resolve(base, s)),
        allowed_uids: a.allowed_uids.unwrap_or_default(),
        listen,
        tokens,
        max_connections: max_connections.max(1),
        max_body_bytes,
        request_timeout: p.duration(
            "admin.request_timeout".into(),
            a.request_timeout.as_deref(),
            Duration::from_secs(10),
        ),
    })
}

/// SHA-256 of a byte string.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn check_readable(p: &mut Problems, key: String, path: &Path) {
    if let Err(e) = std::fs::File::open(path) {
        p.push(key, format!("cannot read {}: {e}", path.display()));
    }
}

fn validate_listener(
    l: RawListener,
    key: &str,
    base: &Path,
    p: &mut Problems,
) -> Option<ListenerConfig> {
    if l.name.is_empty() {
        p.push(format!("{key}.name"), "must not be empty");
    }
    let listen = match l.listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(
                format!("{key}.listen"),
                format!("`{}` is not an IP:PORT address", l.listen),
            );
            None
        }
    };
    let tls = l.tls.map(|t| {
        let cert = resolve(base, t.cert);
        let key_path = resolve(base, t.key);
        check_readable(p, format!("{key}.tls.cert"), &cert);
        check_readable(p, format!("{key}.tls.key"), &key_path);
        let mut sni_certs = Vec::new();
        for (i, pair) in t.sni_certs.into_iter().enumerate() {
            let c = resolve(base, pair.cert);
            let k = resolve(base, pair.key);
            check_readable(p, format!("{key}.tls.sni_certs[{i}].cert"), &c);
            check_readable(p, format!("{key}.tls.sni_certs[{i}].key"), &k);
            sni_certs.push((c, k));
        }
        ListenerTls {
            cert,
            key: key_path,
            sni_certs,
        }
    });
    let mut trusted_proxies = Vec::new();
    for (i, t) in l.trusted_proxies.iter().enumerate() {
        match t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
        {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => p.push(
                format!("{key}.trusted_proxies[{i}]"),
                format!("`{t}` is not an IP address or CIDR network"),
            ),
        }
    }
    if l.proxy_protocol && trusted_proxies.is_empty() {
        p.push(
            format!("{key}.proxy_protocol"),
            "needs trusted_proxies: PROXY headers are only believed from them",
        );
    }
    let max_connections = l.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
    if max_connections == 0 {
        p.push(format!("{key}.max_connections"), "must be at least 1");
    }
    let max_header_bytes = l.max_header_bytes.unwrap_or(defaults::MAX_HEADER_BYTES);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        p.push(
            format!("{key}.max_header_bytes"),
            format!("{max_header_bytes} is out of range 1024..=1048576"),
        );
    }
    let h2_max_concurrent_streams = l
        .h2_max_concurrent_streams
        .unwrap_or(defaults::H2_MAX_CONCURRENT_STREAMS);
    if h2_max_concurrent_streams == 0 {
        p.push(
            format!("{key}.h2_max_concurrent_streams"),
            "must be at least 1",
        );
    }
    let notsent_lowat = l
        .notsent_lowat_bytes
        .unwrap_or(defaults::NOTSENT_LOWAT_BYTES);
    if notsent_lowat != 0 && !(1024..=16 << 20).contains(&notsent_lowat) {
        p.push(
            format!("{key}.notsent_lowat_bytes"),
            format!("must be 0 (the kernel's setting) or in 1024..=16777216 (got {notsent_lowat})"),
        );
    }
    let request_buffer = l
        .request_buffer_bytes
        .unwrap_or(defaults::REQUEST_BUFFER_BYTES);
    if request_buffer > 1 << 20 {
        p.push(
            format!("{key}.request_buffer_bytes"),
            format!("must be at most 1048576 (got {request_buffer}); 0 streams bodies unbuffered"),
        );
    }
    let cfg = ListenerConfig {
        name: l.name,
        listen: listen?,
        tls,
        trusted_proxies,
        proxy_protocol: l.proxy_protocol,
        max_connections,
        max_header_bytes,
        handshake_timeout: p.duration(
            format!("{key}.handshake_timeout"),
            l.handshake_timeout.as_deref(),
            defaults::HANDSHAKE_TIMEOUT,
        ),
        header_timeout: p.duration(
            format!("{key}.header_timeout"),
            l.header_timeout.as_deref(),
            defaults::HEADER_TIMEOUT,
        ),
        idle_timeout: p.duration(
            format!("{key}.idle_timeout"),
            l.idle_timeout.as_deref(),
            defaults::IDLE_TIMEOUT,
        ),
        body_idle_timeout: p.duration(
            format!("{key}.body_idle_timeout"),
            l.body_idle_timeout.as_deref(),
            defaults::BODY_IDLE_TIMEOUT,
        ),
        send_timeout: p.duration(
            format!("{key}.send_timeout"),
            l.send_timeout.as_deref(),
            defaults::SEND_TIMEOUT,
        ),
        h2_max_concurrent_streams,
        notsent_lowat_bytes: (notsent_lowat != 0).then_some(notsent_lowat),
        request_buffer_bytes: request_buffer as usize,
        fast_http1: l.fast_http1.unwrap_or(true),
    };
    Some(cfg)
}

fn validate_service(
    s: RawService,
    key: &str,
    base: &Path,
    listeners: &[ListenerConfig],
    p: &mut Problems,
) -> Option<ServiceConfig> {
    if s.name.is_empty() {
        p.push(format!("{key}.name"), "must not be empty");
    } else if !s
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        p.push(
            format!("{key}.name"),
            "may only contain letters, digits, '-', '_' and '.' (it appears in URLs and metric labels)",
        );
    }
    let raw_hosts = s.hosts.unwrap_or_else(|| vec!["*".into()]);
    if raw_hosts.is_empty() {
        p.push(
            format!("{key}.hosts"),
            "must list at least one host (\"*\" matches any)",
        );
    }
    let mut hosts = Vec::with_capacity(raw_hosts.len());
    for (i, h) in raw_hosts.iter().enumerate() {
        match parse_host_pattern(h) {
            Ok(pat) => hosts.push(pat),
            Err(e) => p.push(format!("{key}.hosts[{i}]"), e),
        }
    }
    let path_prefix = s.path_prefix.unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') {
        p.push(format!("{key}.path_prefix"), "must start with '/'");
    }
    let svc_listeners = s.listeners.unwrap_or_default();
    for (i, name) in svc_listeners.iter().enumerate() {
        if !listeners.iter().any(|l| &l.name == name) {
            p.push(
                format!("{key}.listeners[{i}]"),
                format!("no listener is named `{name}`"),
            );
        }
    }
    let candidate_bp = match percent_to_bp(s.candidate_percent.unwrap_or(0.0)) {
        Ok(bp) => bp,
        Err(e) => {
            p.push(format!("{key}.candidate_percent"), e);
            0
        }
    };
    let sticky = s.sticky.and_then(|st| {
        let set = st.header.is_some() as u8
            + st.cookie.is_some() as u8
            + st.client_ip.unwrap_or(false) as u8;
        if set != 1 {
            p.push(
                format!("{key}.sticky"),
                "set exactly one of header = \"..\", cookie = \"..\" or client_ip = true",
            );
            return None;
        }
        if let Some(h) = st.header {
            match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(n) => Some(Sticky::Header(n)),
                Err(_) => {
                    p.push(
                        format!("{key}.sticky.header"),
                        format!("`{h}` is not a header name"),
                    );
                    None
                }
            }
        } else if let Some(c) = st.cookie {
            if c.is_empty() || c.contains(['=', ';', ' ']) {
                p.push(
                    format!("{key}.sticky.cookie"),
                    format!("`{c}` is not a cookie name"),
                );
                None
            } else {
                Some(Sticky::Cookie(c))
            }
        } else {
            Some(Sticky::ClientIp)
        }
    });
    let header = |p: &mut Problems, k: &str, v: Option<String>| -> Option<HeaderName> {
        let v = v?;
        match HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                p.push(format!("{key}.{k}"), format!("`{v}` is not a header name"));
                None
            }
        }
    };
    let override_header = header(p, "override_header", s.override_header);
    if s.override_secret.is_some() && override_header.is_none() {
        p.push(format!("{key}.override_secret"), "needs override_header");
    }
    if s.override_secret.as_deref() == Some("") {
        p.push(format!("{key}.override_secret"), "must not be empty");
    }
    let override_ = override_header.map(|header| OverrideConfig {
        header,
        secret: s.override_secret,
    });
    let color_header = header(p, "color_header", s.color_header);

    let blue = validate_pool(
        s.blue,
        &format!("{key}.blue"),
        &s.upstream,
        s.health.as_ref(),
        base,
        p,
    );
    let green = validate_pool(
        s.green,
        &format!("{key}.green"),
        &s.upstream,
        s.health.as_ref(),
        base,
        p,
    );
    let salt = s.salt.unwrap_or_else(|| s.name.clone());
    let rollback = validate_rollback(
        s.rollback.unwrap_or_default(),
        &format!("{key}.rollback"),
        p,
    );
    let rollout = s
        .rollout
        .map(|r| validate_rollout(r, &format!("{key}.rollout"), rollback.min_requests, p));
    Some(ServiceConfig {
        name: s.name,
        hosts,
        path_prefix,
        listeners: svc_listeners,
        stable: s.stable.unwrap_or(Color::Blue),
        candidate_bp,
        sticky,
        salt,
        override_,
        color_header,
        fallback: s.fallback.unwrap_or(true),
        rollback,
        rollout: rollout.flatten(),
        blue: blue?,
        green: green?,
    })
}

fn validate_health(raw: Option<&RawHealth>, key: &str, p: &mut Problems) -> HealthConfig {
    let d = RawHealth::default();
    let h = raw.unwrap_or(&d);
    let active = h.path.as_ref().map(|path| {
        if !path.starts_with('/') {
            p.push(format!("{key}.path"), "must start with '/'");
        }
        let method = match h.method.as_deref().unwrap_or("GET").parse::<http::Method>() {
            Ok(m) => m,
            Err(_) => {
                p.push(format!("{key}.method"), "not an HTTP method");
                http::Method::GET
            }
        };
        let jitter = h.jitter.unwrap_or(0.1);
        if !(0.0..=0.5).contains(&jitter) {
            p.push(
                format!("{key}.jitter"),
                "must be in 0.0..=0.5 (a fraction of the interval)",
            );
        }
        let expect = h.expect.clone().unwrap_or_default();
        if expect.iter().any(|c| !(100..=599).contains(c)) {
            p.push(format!("{key}.expect"), "statuses must be in 100..=599");
        }
        let rise = h.rise.unwrap_or(2);
        let fall = h.fall.unwrap_or(3);
        if rise == 0 || fall == 0 {
            p.push(format!("{key}.rise"), "rise and fall must be at least 1");
        }
        let interval = p.duration(
            format!("{key}.interval"),
            h.interval.as_deref(),
            Duration::from_secs(2),
        );
        let timeout = p.duration(
            format!("{key}.timeout"),
            h.timeout.as_deref(),
            Duration::from_secs(1),
        );
        if timeout > interval {
            p.push(format!("{key}.timeout"), "must not exceed the interval");
        }
        ActiveCheck {
            method,
            path: path.clone(),
            host: h.host.clone(),
            expect,
            interval,
            jitter: jitter.clamp(0.0, 0.5),
            timeout,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    });
    let eject_for = p.duration(
        format!("{key}.eject_for"),
        h.eject_for.as_deref(),
        Duration::from_secs(10),
    );
    let eject_max = p.duration(
        format!("{key}.eject_max"),
        h.eject_max.as_deref(),
        Duration::from_secs(300),
    );
    if eject_max < eject_for {
        p.push(format!("{key}.eject_max"), "must be at least eject_for");
    }
    HealthConfig {
        active,
        eject_after: h.eject_after.unwrap_or(5),
        eject_for,
        eject_max,
    }
}

/// Merges a pool's `health` table over the service's.
fn merge_health(svc: Option<&RawHealth>, pool: Option<&RawHealth>) -> Option<RawHealth> {
    match (svc, pool) {
        (None, None) => None,
        (Some(s), None) => Some(s.clone()),
        (None, Some(p)) => Some(p.clone()),
        (Some(s), Some(p)) => Some(RawHealth {
            path: p.path.clone().or(s.path.clone()),
            method: p.method.clone().or(s.method.clone()),
            host: p.host.clone().or(s.host.clone()),
            expect: p.expect.clone().or(s.expect.clone()),
            interval: p.interval.clone().or(s.interval.clone()),
            jitter: p.jitter.or(s.jitter),
            timeout: p.timeout.clone().or(s.timeout.clone()),
            rise: p.rise.or(s.rise),
            fall: p.fall.or(s.fall),
            eject_after: p.eject_after.or(s.eject_after),
            eject_for: p.eject_for.clone().or(s.eject_for.clone()),
            eject_max: p.eject_max.clone().or(s.eject_max.clone()),
        }),
    }
}

fn ratio(p: &mut Problems, key: String, v: Option<f64>, default: f64) -> f64 {
    let v = v.unwrap_or(default);
    if !(0.0..=1.0).contains(&v) {
        p.push(key, format!("{v} is not a ratio in 0.0..=1.0"));
        return default;
    }
    v
}

fn validate_rollback(r: RawRollback, key: &str, p: &mut Problems) -> RollbackConfig {
    let mut step_down = Vec::new();
    for (i, s) in r.step_down.unwrap_or_default().into_iter().enumerate() {
        match percent_to_bp(s) {
            Ok(bp) => step_down.push(bp),
            Err(e) => p.push(format!("{key}.step_down[{i}]"), e),
        }
    }
    if step_down.windows(2).any(|w| w[1] >= w[0]) {
        p.push(
            format!("{key}.step_down"),
            "must be strictly decreasing (e.g. [10, 1])",
        );
    }
    let latency_factor = r.latency_factor.unwrap_or(3.0);
    if latency_factor != 0.0 && latency_factor < 1.0 {
        p.push(
            format!("{key}.latency_factor"),
            "must be 0 (off) or at least 1",
        );
    }
    let consecutive = r.consecutive.unwrap_or(3);
    if consecutive == 0 {
        p.push(format!("{key}.consecutive"), "must be at least 1");
    }
    RollbackConfig {
        enabled: r.enabled.unwrap_or(true),
        bucket: p.duration(
            format!("{key}.bucket"),
            r.bucket.as_deref(),
            Duration::from_secs(1),
        ),
        evaluate_every: p.duration(
            format!("{key}.evaluate_every"),
            r.evaluate_every.as_deref(),
            Duration::from_millis(250),
        ),
        min_requests: r.min_requests.unwrap_or(20),
        max_failure_ratio: ratio(
            p,
            format!("{key}.max_failure_ratio"),
            r.max_failure_ratio,
            0.05,
        ),
        relative_margin: ratio(p, format!("{key}.relative_margin"), r.relative_margin, 0.02),
        latency_factor,
        latency_floor: p.duration(
            format!("{key}.latency_floor"),
            r.latency_floor.as_deref(),
            Duration::from_millis(250),
        ),
        consecutive: consecutive.max(1),
        min_healthy_fraction: ratio(
            p,
            format!("{key}.min_healthy_fraction"),
            r.min_healthy_fraction,
            0.5,
        ),
        step_down,
    }
}

fn validate_rollout(
    r: RawRollout,
    key: &str,
    min_requests: u64,
    p: &mut Problems,
) -> Option<RolloutConfig> {
    let percents = match (r.steps, r.ramp_step) {
        (Some(s), None) => s,
        (None, Some(step)) if step > 0.0 && step <= 100.0 => {
            let mut v = Vec::new();
            let mut x = step;
            while x < 100.0 {
                v.push((x * 100.0).round() / 100.0);
                x += step;
            }
            v.push(100.0);
            v
        }
        (None, Some(_)) => {
            p.push(format!("{key}.ramp_step"), "must be in (0, 100]");
            return None;
        }
        _ => {
            p.push(
                key.to_string(),
                "set exactly one of steps = [..] or ramp_step = N",
            );
            return None;
        }
    };
    let mut steps = Vec::new();
    for (i, s) in percents.iter().enumerate() {
        match percent_to_bp(*s) {
            Ok(0) => p.push(format!("{key}.steps[{i}]"), "a step of 0 moves nothing"),
            Ok(bp) => steps.push(bp),
            Err(e) => p.push(format!("{key}.steps[{i}]"), e),
        }
    }
    if steps.windows(2).any(|w| w[1] <= w[0]) {
        p.push(format!("{key}.steps"), "must be strictly increasing");
    }
    if steps.last() != Some(&10_000) {
        p.push(
            format!("{key}.steps"),
            "must end at 100 (the final step promotes)",
        );
    }
    let mut preflight = Vec::new();
    for (i, pf) in r.preflight.into_iter().enumerate() {
        let k = format!("{key}.preflight[{i}]");
        let method = match pf
            .method
            .as_deref()
            .unwrap_or("GET")
            .parse::<http::Method>()
        {
            Ok(m) => m,
            Err(_) => {
                p.push(format!("{k}.method"), "not an HTTP method");
                continue;
            }
        };
        if !pf.path.starts_with('/') {
            p.push(format!("{k}.path"), "must start with '/'");
        }
        let mut headers = Vec::new();
        for (name, value) in pf.headers {
            match (
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => p.push(format!("{k}.headers.{name}"), "not a valid header"),
            }
        }
        preflight.push(Preflight {
            method,
            path: pf.path,
            headers,
            body: pf.body,
            expect: pf.expect.unwrap_or_default(),
        });
    }
    Some(RolloutConfig {
        steps,
        hold: p.duration(
            format!("{key}.hold"),
            r.hold.as_deref(),
            Duration::from_secs(300),
        ),
        min_requests: r.min_requests.unwrap_or(min_requests),
        preflight,
    })
}

fn parse_host_pattern(h: &str) -> Result<HostPattern, String> {
    let h = h.trim().to_ascii_lowercase();
    if h == "*" {
        return Ok(HostPattern::Any);
    }
    let (suffix, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    let valid = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        });
    if !valid {
        return Err(format!(
            "`{h}` is not a host pattern (use \"*\", \"api.example.com\" or \"*.example.com\")"
        ));
    }
    Ok(if suffix {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_string())
    })
}

fn validate_pool(
    pool: RawPool,
    key: &str,
    svc: &RawUpstream,
    svc_health: Option<&RawHealth>,
    base: &Path,
    p: &mut Problems,
) -> Option<PoolConfig> {
    let health = validate_health(
        merge_health(svc_health, pool.health.as_ref()).as_ref(),
        &format!("{key}.health"),
        p,
    );
    if pool.endpoints.is_empty() {
        p.push(
            format!("{key}.endpoints"),
            "must list at least one endpoint",
        );
    }
    let mut endpoints: Vec<SocketAddr> = Vec::with_capacity(pool.endpoints.len());
    for (i, e) in pool.endpoints.iter().enumerate() {
        match e.parse::<SocketAddr>() {
            Ok(a) if endpoints.contains(&a) => p.push(
                format!("{key}.endpoints[{i}]"),
                format!("{a} is listed twice"),
            ),
            Ok(a) if a.port() == 0 => p.push(
                format!("{key}.endpoints[{i}]"),
                "port 0 is not a valid endpoint",
            ),
            Ok(a) => endpoints.push(a),
            Err(_) => p.push(
                format!("{key}.endpoints[{i}]"),
                format!("`{e}` is not an IP:PORT address (host names are not resolved)"),
            ),
        }
    }
    let protocol = pool.protocol.or(svc.protocol).unwrap_or(Protocol::Http1);
    let tls_raw = pool.tls.or_else(|| svc.tls.clone());
    let tls = tls_raw.map(|t| {
        let ca = t.ca.map(|c| resolve(base, c));
        if let Some(ca) = &ca {
            check_readable(p, format!("{key}.tls.ca"), ca);
        }
        if let Some(name) = &t.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                p.push(
                    format!("{key}.tls.server_name"),
                    format!("`{name}` is not a DNS name or IP"),
                );
            }
        }
        UpstreamTls {
            ca,
            server_name: t.server_name,
        }
    });
    match (protocol, &tls) {
        (Protocol::H2, None) => p.push(
            format!("{key}.protocol"),
            "\"h2\" is HTTP/2 over TLS and needs tls = { .. }; use \"h2c\" for cleartext HTTP/2",
        ),
        (Protocol::H2c, Some(_)) => p.push(
            format!("{key}.protocol"),
            "\"h2c\" is cleartext; use \"h2\" for HTTP/2 over TLS",
        ),
        _ => {}
    }
    let max_idle = pool
        .max_idle_per_endpoint
        .or(svc.max_idle_per_endpoint)
        .unwrap_or(defaults::MAX_IDLE_PER_ENDPOINT);
    if max_idle == 0 || max_idle > 65_536 {
        p.push(
            format!("{key}.max_idle_per_endpoint"),
            "must be in 1..=65536",
        );
    }
    let read_buffer = pool
        .read_buffer_bytes
        .or(svc.read_buffer_bytes)
        .unwrap_or(defaults::READ_BUFFER_BYTES);
    if !(defaults::MIN_READ_BUFFER_BYTES..=defaults::MAX_READ_BUFFER_BYTES).contains(&read_buffer) {
        p.push(
            format!("{key}.read_buffer_bytes"),
            format!(
                "must be in {}..={} (got {read_buffer})",
                defaults::MIN_READ_BUFFER_BYTES,
                defaults::MAX_READ_BUFFER_BYTES
            ),
        );
    }
    let upstream = UpstreamSettings {
        protocol,
        connect_timeout: p.duration(
            format!("{key}.connect_timeout"),
            pool.connect_timeout
                .as_deref()
                .or(svc.connect_timeout.as_deref()),
            defaults::CONNECT_TIMEOUT,
        ),
        response_timeout: p.duration(
            format!("{key}.response_timeout"),
            pool.response_timeout
                .as_deref()
                .or(svc.response_timeout.as_deref()),
            defaults::RESPONSE_TIMEOUT,
        ),
        idle_timeout: p.duration(
            format!("{key}.idle_timeout"),
            pool.idle_timeout.as_deref().or(svc.idle_timeout.as_deref()),
            defaults::UPSTREAM_IDLE_TIMEOUT,
        ),
        max_idle_per_endpoint: max_idle.clamp(1, 65_536),
        read_buffer_bytes: read_buffer.clamp(
            defaults::MIN_READ_BUFFER_BYTES,
            defaults::MAX_READ_BUFFER_BYTES,
        ),
        fast_http1: pool.fast_http1.or(svc.fast_http1).unwrap_or(true),
        tls,
    };
    Some(PoolConfig {
        endpoints,
        upstream,
        health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[listener]]
name = "public"
listen = "127.0.0.1:8080"

[[service]]
name = "gateway"
candidate_percent = 10.0
sticky = { header = "X-User-Id" }
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"] }
green = { endpoints = ["127.0.0.1:9001"] }
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        let s = &c.services[0];
        assert_eq!(s.candidate_bp, 1000);
        assert_eq!(s.stable, Color::Blue);
        assert_eq!(s.hosts, vec![HostPattern::Any]);
        assert_eq!(s.path_prefix, "/");
        assert_eq!(s.salt, "gateway");
        assert_eq!(
            s.sticky,
            Some(Sticky::Header(HeaderName::from_static("x-user-id")))
        );
        assert_eq!(s.blue.upstream.connect_timeout, defaults::CONNECT_TIMEOUT);
        assert_eq!(s.blue.upstream.read_buffer_bytes, 16 * 1024);
        assert_eq!(c.listeners[0].max_header_bytes, 64 * 1024);
    }

    #[test]
    fn fast_http1_is_on_by_default_and_set_per_service_and_pool() {
        let c = Config::parse(MINIMAL).unwrap();
        assert!(c.services[0].blue.upstream.fast_http1);
        let text = MINIMAL.replace(
            "green = { endpoints = [\"127.0.0.1:9001\"] }",
            "green = { endpoints = [\"127.0.0.1:9001\"], fast_http1 = true }\n\
             [service.upstream]\nfast_http1 = false",
        );
        let c = Config::parse(&text).unwrap();
        assert!(!c.services[0].blue.upstream.fast_http1);
        assert!(c.services[0].green.upstream.fast_http1);
        let bad = MINIMAL.replace(
            "green = { endpoints = [\"127.0.0.1:9001\"] }",
            "green = { endpoints = [\"127.0.0.1:9001\"], fast_http1 = \"yes\" }",
        );
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("fast_http1"), "{e}");
    }

    #[test]
    fn read_buffer_is_set_per_service_and_pool_within_bounds() {
        let text = MINIMAL.replace(
            "green = { endpoints = [\"127.0.0.1:9001\"] }",
            "green = { endpoints = [\"127.0.0.1:9001\"], read_buffer_bytes = 1048576 }\n\
             [service.upstream]\nread_buffer_bytes = 32768",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.services[0].blue.upstream.read_buffer_bytes, 32_768);
        assert_eq!(c.services[0].green.upstream.read_buffer_bytes, 1 << 20);
        for bad in ["4096", "0", "33554432"] {
            let text = MINIMAL.replace(
                "blue  = { endpoints = [\"127.0.0.1:8001\", \"127.0.0.1:8002\"] }",
                &format!(
                    "blue  = {{ endpoints = [\"127.0.0.1:8001\"], read_buffer_bytes = {bad} }}"
                ),
            );
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "service[gateway].blue.read_buffer_bytes: must be in 8192..=16777216 (got {bad})"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn notsent_lowat_defaults_to_16k_can_be_off_and_is_bounded() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].notsent_lowat_bytes, Some(16384));
        let with = |v: &str| {
            MINIMAL.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\nnotsent_lowat_bytes = {v}"),
            )
        };
        let c = Config::parse(&with("65536")).unwrap();
        assert_eq!(c.listeners[0].notsent_lowat_bytes, Some(65536));
        let c = Config::parse(&with("0")).unwrap();
        assert_eq!(
            c.listeners[0].notsent_lowat_bytes, None,
            "0: the kernel's setting"
        );
        for bad in ["1", "512", "33554432"] {
            let e = Config::parse(&with(bad)).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "listener[public].notsent_lowat_bytes: must be 0 (the kernel's setting) or in 1024..=16777216 (got {bad})"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn request_buffer_defaults_to_16k_can_be_off_and_is_bounded() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].request_buffer_bytes, 16384);
        let with = |v: &str| {
            MINIMAL.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\nrequest_buffer_bytes = {v}"),
            )
        };
        assert_eq!(
            Config::parse(&with("0")).unwrap().listeners[0].request_buffer_bytes,
            0
        );
        assert_eq!(
            Config::parse(&with("1048576")).unwrap().listeners[0].request_buffer_bytes,
            1 << 20
        );
        let e = Config::parse(&with("1048577")).unwrap_err().to_string();
        assert!(
            e.contains(
                "listener[public].request_buffer_bytes: must be at most 1048576 (got 1048577)"
            ),
            "{e}"
        );
        let e = Config::parse(&with("-1")).unwrap_err().to_string();
        assert!(e.contains("request_buffer_bytes"), "{e}");
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cyan.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.services.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("candidate_percent", "candidate_percnt");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("candidate_percnt"), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn every_bad_value_is_reported_by_key() {
        let text = r#"
[[listener]]
name = "public"
listen = "not-an-address"
trusted_proxies = ["10.0.0.0/33"]

[[service]]
name = "gateway"
candidate_percent = 120
blue  = { endpoints = [] }
green = { endpoints = ["127.0.0.1:9001", "127.0.0.1:9001", "nohost"], connect_timeout = "3 parsecs" }

[[service]]
name = "gateway"
candidate_percent = 1.234
blue  = { endpoints = ["127.0.0.1:1"], protocol = "h2" }
green = { endpoints = ["127.0.0.1:2"], tls = { ca = "/nonexistent/ca.pem" } }
"#;
        let e = Config::parse(text).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "listener[public].listen",
            "listener[public].trusted_proxies[0]",
            "service[gateway].candidate_percent",
            "service[gateway].blue.endpoints",
            "service[gateway].green.endpoints[1]",
            "service[gateway].green.endpoints[2]",
            "service[gateway].green.connect_timeout",
            "service[gateway].name",
            "service[gateway].blue.protocol",
            "service[gateway].green.tls.ca",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
    }

    #[test]
    fn metrics_listener_is_on_by_default_and_can_be_turned_off() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9900".parse().unwrap()));
        let off = Config::parse(&format!("[metrics]\nlisten = \"off\"\n{MINIMAL}")).unwrap();
        assert_eq!(off.metrics_listen, None);
        let bad = Config::parse(&format!("[metrics]\nlisten = \"nine\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(bad.problems[0].key, "metrics.listen");
    }

    #[test]
    fn percent_conversion() {
        assert_eq!(percent_to_bp(0.0), Ok(0));
        assert_eq!(percent_to_bp(12.5), Ok(1250));
        assert_eq!(percent_to_bp(0.01), Ok(1));
        assert_eq!(percent_to_bp(100.0), Ok(10000));
        assert!(percent_to_bp(100.01).is_err());
        assert!(percent_to_bp(-1.0).is_err());
        assert!(percent_to_bp(f64::NAN).is_err());
        assert!(percent_to_bp(33.333).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn sticky_needs_exactly_one_key() {
        let text = MINIMAL.replace(
            "sticky = { header = \"X-User-Id\" }",
            "sticky = { header = \"x\", cookie = \"y\" }",
        );
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "service[gateway].sticky");
    }

    #[test]
    fn overlapping_services_are_rejected() {
        let text = format!(
            "{MINIMAL}\n[[service]]\nname = \"other\"\nblue = {{ endpoints = [\"127.0.0.1:1\"] }}\ngreen = {{ endpoints = [\"127.0.0.1:2\"] }}\n"
        );
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.problems[0].key, "service[other].hosts");
    }
}
