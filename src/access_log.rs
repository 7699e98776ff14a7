//! The access log: one JSON line per request, written when the response
//! ends (or the client goes away).
//!
//! The request path only fills a small record (reference-counted clones of
//! what it already has) and `try_send`s it into a bounded channel; a writer
//! task formats and writes the lines in batches. A slow disk therefore never
//! stalls traffic: when the queue is full the record is dropped and counted
//! (`cyan_access_log_dropped_total`).
//!
//! Fields: `time`, `request_id`, `client`, `method`, `host`, `path`,
//! `protocol`, `status`, `bytes_in`, `bytes_out`, `duration_ms`, `service`,
//! `color`, `color_reason` (override / sticky / draw / fixed / fallback),
//! `endpoint`, `generation`, `error` (absent when none).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use prometheus::IntCounter;
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::Color;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// One request, as the request path hands it over.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub request_id: Option<HeaderValue>,
    pub client: SocketAddr,
    pub method: Method,
    pub host: Option<HeaderValue>,
    pub uri: Uri,
    pub version: Version,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub service: Option<Arc<str>>,
    pub color: Option<Color>,
    pub reason: Option<&'static str>,
    pub endpoint: Option<SocketAddr>,
    pub generation: u64,
    pub error: Option<&'static str>,
}

/// The handle the request path uses.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Record>,
    dropped: IntCounter,
}

/// Records queued before new ones are dropped.
const QUEUE: usize = 16_384;

impl AccessLog {
    /// Opens the target and starts the writer task.
    pub fn start(target: &Target, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
        // Formatting and writing happen on a blocking thread: a slow disk
        // holds up only this thread.
        std::thread::Builder::new()
            .name("cyan-access-log".into())
            .spawn(move || {
                let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    for r in &batch {
                        let _ = serde_json::to_writer(&mut w, &line(r));
                        let _ = w.write_all(b"\n");
                    }
                    let _ = w.flush();
                }
                let _ = w.flush();
            })?;
        Ok(AccessLog { tx, dropped })
    }

    /// Queues a record; never blocks.
    #[inline]
    pub fn log(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }
}

fn line(r: &Record) -> serde_json::Value {
    let s = |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut v = json!({
        "time": humantime::format_rfc3339_millis(r.time).to_string(),
        "request_id": s(&r.request_id),
        "client": r.client.to_string(),
        "method": r.method.as_str(),
        "host": s(&r.host).or_else(|| r.uri.authority().map(|a| a.to_string())),
        "path": r.uri.path_and_query().map_or("/", |p| p.as_str()),
        "protocol": format!("{:?}", r.version),
        "status": r.status,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "duration_ms": (r.duration.as_secs_f64() * 1e6).round() / 1e3,
        "service": r.service.as_deref(),
        "color": r.color.map(|c| c.as_str()),
        "color_reason": r.reason,
        "endpoint": r.endpoint.map(|e| e.to_string()),
        "generation": r.generation,
    });
    if let Some(e) = r.error {
        v["error"] = json!(e);
    }
    v
}
