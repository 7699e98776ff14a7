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
