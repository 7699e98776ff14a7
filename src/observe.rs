//! The metrics and health listener (`[metrics] listen`):
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | every family in the Prometheus text format |
//! | `GET /livez` | 200 while the process runs |
//! | `GET /readyz` | 200 once the config is loaded and listeners are bound; 503 while draining |
//!
//! It is separate from the data listeners so probes and scrapes keep working
//! whatever the data path is doing, and has its own small connection cap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Starts the listener (on `inherited` when a previous process handed its
/// socket over); returns its address and a duplicate of its socket.
pub async fn start(
    addr: SocketAddr,
    inherited: Option<std::os::fd::OwnedFd>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, std::os::fd::OwnedFd)> {
    use std::os::fd::AsFd;
    let listener = match inherited {
        Some(fd) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(addr).await?,
    };
    let local = listener.local_addr()?;
    let dup = listener.as_fd().try_clone_to_owned()?;
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(64));
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let (metrics, ready, stop) = (metrics.clone(), ready.clone(), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (metrics, ready) = (metrics.clone(), ready.clone());
                    async move { Ok::<_, Infallible>(answer(&req, metrics, &ready).await) }
                });
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5));
                tokio::select! {
                    _ = b.serve_connection(TokioIo::new(stream), svc) => {}
                    _ = stop.cancelled() => {}
                }
                drop(permit);
            });
        }
    });
    Ok((local, dup))
}

async fn answer(
    req: &Request<Incoming>,
    metrics: Arc<Metrics>,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            // Rendered on the blocking pool, not on a worker: the process
            // collector lists /proc/self/fd, which with thousands of
            // connections open took ~0.3 ms that every proxied request
            // queued behind on a worker (one worker: all of them).
            let rendered = tokio::task::spawn_blocking(move || metrics.render()).await;
            match rendered {
                Ok(body) => text(
                    StatusCode::OK,
                    body,
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("rendering the metrics failed: {e}\n"),
                    "text/plain",
                ),
            }
        }
        "/livez" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            if ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready\n".into(),
                    "text/plain",
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /livez or /readyz\n".into(),
            "text/plain",
        ),
    }
}
