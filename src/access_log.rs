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
    /// Opens the target and starts the writer thread. The thread ends (after
    /// writing everything queued) once every `AccessLog` clone is dropped;
    /// join the handle to be sure the tail is on disk.
    pub fn start(
        target: &Target,
        dropped: IntCounter,
    ) -> std::io::Result<(AccessLog, std::thread::JoinHandle<()>)> {
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
        // Formatting and writing happen on a thread of their own: a slow
        // disk holds up only this thread. It wakes on a short cadence and
        // writes whatever queued up, so the request path never has to wake
        // it (no futex per record) and writes are batched.
        let writer = std::thread::Builder::new()
            .name("cyan-access-log".into())
            .spawn(move || {
                let mut w = std::io::BufWriter::with_capacity(64 * 1024, out);
                loop {
                    let mut closed = false;
                    loop {
                        match rx.try_recv() {
                            Ok(r) => {
                                let _ = serde_json::to_writer(&mut w, &Line::of(&r));
                                let _ = w.write_all(b"\n");
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    let _ = w.flush();
                    if closed {
                        return;
                    }
                    std::thread::sleep(FLUSH_EVERY);
                }
            })?;
        Ok((AccessLog { tx, dropped }, writer))
    }

    /// Queues a record; never blocks.
    #[inline]
    pub fn log(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }
}

/// How often the writer wakes to write what queued up.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// One line as written: borrowed from the record, serialized directly.
#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    request_id: Option<&'a str>,
    client: SocketAddr,
    method: &'a str,
    host: Option<std::borrow::Cow<'a, str>>,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: f64,
    service: Option<&'a str>,
    color: Option<&'static str>,
    color_reason: Option<&'static str>,
    endpoint: Option<SocketAddr>,
    generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

impl<'a> Line<'a> {
    fn of(r: &'a Record) -> Line<'a> {
        let s = |v: &'a Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok());
        Line {
            time: humantime::format_rfc3339_millis(r.time).to_string(),
            request_id: s(&r.request_id),
            client: r.client,
            method: r.method.as_str(),
            host: s(&r.host).map(std::borrow::Cow::Borrowed).or_else(|| {
                r.uri
                    .authority()
                    .map(|a| std::borrow::Cow::Borrowed(a.as_str()))
            }),
            path: r.uri.path_and_query().map_or("/", |p| p.as_str()),
            protocol: match r.version {
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_3 => "HTTP/3.0",
                _ => "HTTP/?",
            },
            status: r.status,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            duration_ms: (r.duration.as_secs_f64() * 1e6).round() / 1e3,
            service: r.service.as_deref(),
            color: r.color.map(|c| c.as_str()),
            color_reason: r.reason,
            endpoint: r.endpoint,
            generation: r.generation,
            error: r.error,
        }
    }
}
