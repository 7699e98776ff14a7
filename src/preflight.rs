//! Preflight checks: the functional test cases every upgrade guide asks
//! for, sent to every candidate endpoint before a rollout moves any traffic.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use crate::config::Preflight;

/// Per-request limit.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check against every endpoint; `Err` lists each failure.
pub async fn run(checks: &[Preflight], endpoints: &[SocketAddr]) -> Result<(), String> {
    let mut failures = Vec::new();
    for addr in endpoints {
        for c in checks {
            match tokio::time::timeout(TIMEOUT, send(*addr, c)).await {
                Ok(Ok(status)) => {
                    let ok = if c.expect.is_empty() {
                        (200..300).contains(&status)
                    } else {
                        c.expect.contains(&status)
                    };
                    if !ok {
                        failures.push(format!(
                            "{} {} on {addr}: status {status}",
                            c.method, c.path
                        ));
                    }
                }
                Ok(Err(e)) => failures.push(format!("{} {} on {addr}: {e}", c.method, c.path)),
                Err(_) => failures.push(format!(
                    "{} {} on {addr}: no answer within {TIMEOUT:?}",
                    c.method, c.path
                )),
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

async fn send(addr: SocketAddr, c: &Preflight) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(c.method.clone()).uri(&c.path);
    let mut has_host = false;
    for (k, v) in &c.headers {
        has_host |= k == http::header::HOST;
        req = req.header(k, v);
    }
    if !has_host {
        req = req.header(http::header::HOST, addr.to_string());
    }
    let body = Full::new(Bytes::from(c.body.clone().unwrap_or_default()));
    let req = req.body(body).map_err(|e| e.to_string())?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(resp.status().as_u16())
}
