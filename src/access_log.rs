//! The access log: one JSON line per request, written when the response
//! ends (or the client goes away).
//!
//! The request path fills one boxed [`Record`] as it goes and, when the
//! request is accounted for, `try_send`s the box into a bounded channel: a
//! pointer moves, the record is not copied. A writer thread formats and
//! writes the lines in batches. A slow disk therefore never stalls traffic:
//! when the queue is full the record is dropped and counted
//! (`cyan_access_log_dropped_total`).
//!
//! Fields: `time`, `request_id`, `client`, `method`, `host`, `path`,
//! `protocol`, `status`, `bytes_in`, `bytes_out`, `duration_ms`, `service`,
//! `color`, `color_reason` (override / sticky / draw / fixed / fallback),
//! `endpoint`, `generation`, `error` (absent when none).
//!
//! Lines are formatted by hand ([`format_line`]), not through serde: the
//! writer shares the CPU with the proxy, and serde_json plus a `Display`
//! of each address and of the time cost ~9.5k instructions per line against
//! ~1.5k here (callgrind, 12k proxied requests). The text is the same as
//! serde_json wrote: strings escaped as JSON requires, the duration in the
//! shortest decimal form of a whole number of microseconds.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri, Version};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::body::BodySent;
use crate::config::Color;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// One request, filled in by the request path as it learns things.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    /// When the request arrived; `duration` is measured from here.
    pub start: Instant,
    pub request_id: Option<HeaderValue>,
    pub client: SocketAddr,
    pub method: Method,
    pub host: Option<HeaderValue>,
    pub uri: Uri,
    pub version: Version,
    pub status: u16,
    /// Request body bytes; read from `body` when the record is sent.
    pub bytes_in: u64,
    /// The request body's progress, when it has one.
    pub body: Option<BodySent>,
    pub bytes_out: u64,
    pub duration: Duration,
    pub service: Option<Arc<str>>,
    pub color: Option<Color>,
    pub reason: Option<&'static str>,
    pub endpoint: Option<SocketAddr>,
    pub generation: u64,
    pub error: Option<&'static str>,
}

/// The handle the request path uses; a clone is one reference count.
#[derive(Debug, Clone)]
pub struct AccessLog(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    tx: mpsc::Sender<Box<Record>>,
    dropped: IntCounter,
}

/// Records queued before new ones are dropped.
const QUEUE: usize = 16_384;

/// Formatted lines are written once this much has gathered.
const BATCH: usize = 64 * 1024;

impl AccessLog {
    /// Opens the target and starts the writer thread. The thread ends (after
    /// writing everything queued) once every `AccessLog` clone is dropped;
    /// join the handle to be sure the tail is on disk.
    pub fn start(
        target: &Target,
        dropped: IntCounter,
    ) -> std::io::Result<(AccessLog, std::thread::JoinHandle<()>)> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<Box<Record>>(QUEUE);
        // Formatting and writing happen on a thread of their own: a slow
        // disk holds up only this thread. It wakes on a short cadence and
        // writes whatever queued up, so the request path never has to wake
        // it (no futex per record) and writes are batched.
        let writer = std::thread::Builder::new()
            .name("cyan-access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(BATCH + 1024);
                let mut clock = Clock::default();
                loop {
                    let mut closed = false;
                    loop {
                        match rx.try_recv() {
                            Ok(r) => {
                                format_line(&mut buf, &r, &mut clock);
                                drop(r);
                                if buf.len() >= BATCH {
                                    let _ = out.write_all(&buf);
                                    buf.clear();
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if !buf.is_empty() {
                        let _ = out.write_all(&buf);
                        buf.clear();
                    }
                    let _ = out.flush();
                    if closed {
                        return;
                    }
                    std::thread::sleep(FLUSH_EVERY);
                }
            })?;
        Ok((AccessLog(Arc::new(Shared { tx, dropped })), writer))
    }

    /// Queues a finished record; never blocks.
    #[inline]
    pub fn log(&self, r: Box<Record>) {
        if self.0.tx.try_send(r).is_err() {
            self.0.dropped.inc();
        }
    }
}

/// How often the writer wakes to write what queued up.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Appends one record's line, newline included, to `out`.
pub fn format_line(out: &mut Vec<u8>, r: &Record, clock: &mut Clock) {
    // A line is ~330 bytes: room for it at once.
    out.reserve(512);
    out.extend_from_slice(b"{\"time\":\"");
    clock.write(out, r.time);
    out.extend_from_slice(b"\",\"request_id\":");
    opt_str(out, header_text(&r.request_id));
    out.extend_from_slice(b",\"client\":");
    addr(out, r.client);
    out.extend_from_slice(b",\"method\":");
    string(out, r.method.as_str());
    out.extend_from_slice(b",\"host\":");
    opt_str(
        out,
        header_text(&r.host).or_else(|| r.uri.authority().map(|a| a.as_str())),
    );
    out.extend_from_slice(b",\"path\":");
    string(out, r.uri.path_and_query().map_or("/", |p| p.as_str()));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(match r.version {
        Version::HTTP_09 => b"HTTP/0.9",
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_11 => b"HTTP/1.1",
        Version::HTTP_2 => b"HTTP/2.0",
        Version::HTTP_3 => b"HTTP/3.0",
        _ => b"HTTP/?",
    });
    out.extend_from_slice(b"\",\"status\":");
    int(out, r.status);
    out.extend_from_slice(b",\"bytes_in\":");
    int(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    int(out, r.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    millis(out, r.duration);
    out.extend_from_slice(b",\"service\":");
    opt_str(out, r.service.as_deref());
    out.extend_from_slice(b",\"color\":");
    opt_str(out, r.color.map(|c| c.as_str()));
    out.extend_from_slice(b",\"color_reason\":");
    opt_str(out, r.reason);
    out.extend_from_slice(b",\"endpoint\":");
    match r.endpoint {
        Some(a) => addr(out, a),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"generation\":");
    int(out, r.generation);
    if let Some(e) = r.error {
        out.extend_from_slice(b",\"error\":");
        string(out, e);
    }
    out.extend_from_slice(b"}\n");
}

/// A header value as text; `None` when absent or not visible ASCII (it is
/// logged as null, as before: the bytes are not guessed at).
fn header_text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string. `s` is UTF-8, so bytes from 0x80 up pass as they are
/// (JSON text is UTF-8); `"`, `\` and control bytes are escaped. The whole
/// string is checked eight bytes at a time first (the last few padded with
/// a byte that needs none): most strings need no escape and are copied in
/// one piece.
fn string(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    if any_needs_escape(b) {
        escaped(out, b);
    } else {
        out.extend_from_slice(b);
    }
    out.push(b'"');
}

/// Whether some byte of `b` needs an escape. Eight bytes at a time, the
/// last eight overlapping the ones before when the length is not a
/// multiple of eight; a string shorter than that byte by byte.
fn any_needs_escape(b: &[u8]) -> bool {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if b.len() < 8 {
        return b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
    }
    let mut i = 0;
    while i + 8 <= b.len() {
        if needs_escape(word(i)) {
            return true;
        }
        i += 8;
    }
    i < b.len() && needs_escape(word(b.len() - 8))
}

/// `b` with its escapes: runs that need none are copied whole.
fn escaped(out: &mut Vec<u8>, b: &[u8]) {
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        if c >= 0x20 && c != b'"' && c != b'\\' {
            continue;
        }
        out.extend_from_slice(&b[run..i]);
        run = i + 1;
        escape(out, c);
    }
    out.extend_from_slice(&b[run..]);
}

/// Whether any of the eight bytes is a control byte, `"` or `\`.
#[inline]
fn needs_escape(v: u64) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // A byte below n sets its high bit in (v - n) & !v (for n <= 0x80).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let zero = |v: u64| below(v, 1);
    below(v, 0x20) | zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\'))) != 0
}

fn escape(out: &mut Vec<u8>, c: u8) {
    match c {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        }
    }
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An address as a JSON string, `a.b.c.d:port` or `[v6]:port`, as its
/// `Display` writes it.
fn addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            // `"255.255.255.255:65535"` is 23 bytes; built digit by digit
            // on the stack (no copy call per part), then copied once.
            let mut text = [0u8; 24];
            let mut n = 0;
            let mut push = |c: u8| {
                text[n] = c;
                n += 1;
            };
            push(b'"');
            for (i, o) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if o >= 100 {
                    push(b'0' + o / 100);
                }
                if o >= 10 {
                    push(b'0' + o / 10 % 10);
                }
                push(b'0' + o % 10);
            }
            push(b':');
            let port = v4.port();
            let mut div = 10_000;
            while div > 1 && port < div {
                div /= 10;
            }
            while div > 0 {
                push(b'0' + (port / div % 10) as u8);
                div /= 10;
            }
            push(b'"');
            out.extend_from_slice(&text[..n]);
        }
        // Display handles compression and scope ids; no character of it
        // needs a JSON escape.
        SocketAddr::V6(v6) => {
            out.push(b'"');
            let _ = write!(out, "{v6}");
            out.push(b'"');
        }
    }
}

/// Milliseconds with microsecond precision, in the shortest form that
/// reads back as the same number: `12.0`, `0.5`, `3.042`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    int(out, micros / 1000);
    out.push(b'.');
    let mut frac = (micros % 1000) as u16;
    let mut digits = [b'0'; 3];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    let keep = 3 - digits
        .iter()
        .rev()
        .take(2)
        .take_while(|&&c| c == b'0')
        .count();
    out.extend_from_slice(&digits[..keep]);
}

/// RFC 3339 UTC time with milliseconds (`2026-11-23T02:10:59.123Z`). The
/// text up to the seconds is kept and reused while the second lasts: a busy
/// log writes many lines per second.
#[derive(Debug, Default)]
pub struct Clock {
    secs: Option<u64>,
    text: [u8; 19],
}

impl Clock {
    fn write(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let since = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let secs = since.as_secs();
        if self.secs != Some(secs) {
            self.text = civil(secs);
            self.secs = Some(secs);
        }
        out.extend_from_slice(&self.text);
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch (proleptic
/// Gregorian calendar, days to civil date by eras of 400 years). Years past
/// 9999 keep their last four digits; no clock of this century gets there.
fn civil(secs: u64) -> [u8; 19] {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut t = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            t[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3_600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(
        service: &str,
        path: &str,
        client: SocketAddr,
        nanos: u64,
        time: SystemTime,
    ) -> Record {
        Record {
            time,
            start: Instant::now(),
            request_id: Some(HeaderValue::from_static("rid-1")),
            client,
            method: Method::GET,
            host: None,
            uri: format!("http://example.test{path}").parse().unwrap(),
            version: Version::HTTP_11,
            status: 503,
            bytes_in: 7,
            body: None,
            bytes_out: u64::MAX,
            duration: Duration::from_nanos(nanos),
            service: Some(service.into()),
            color: Some(Color::Green),
            reason: Some("sticky"),
            endpoint: None,
            generation: 42,
            error: Some("connect"),
        }
    }

    /// What serde_json wrote for a record before the formatter was written
    /// by hand: the formatter must keep every value the same.
    fn reference(r: &Record) -> serde_json::Value {
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(r.time).to_string(),
            "request_id": header_text(&r.request_id),
            "client": r.client,
            "method": r.method.as_str(),
            "host": header_text(&r.host).or(r.uri.authority().map(|a| a.as_str())),
            "path": r.uri.path_and_query().map_or("/", |p| p.as_str()),
            "protocol": "HTTP/1.1",
            "status": r.status,
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
            "service": r.service.as_deref(),
            "color": r.color.map(|c| c.as_str()),
            "color_reason": r.reason,
            "endpoint": r.endpoint,
            "generation": r.generation,
        })
    }

    /// Compares a line with the reference; the duration apart, as a number
    /// within half a microsecond (the old float rounding and the integer
    /// rounding here may differ on an exact half).
    fn same_values(text: &str, r: &Record) -> Result<(), String> {
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
        let o = v.as_object_mut().unwrap();
        let ms = o
            .remove("duration_ms")
            .and_then(|d| d.as_f64())
            .ok_or("no duration_ms")?;
        let want = r.duration.as_nanos() as f64 / 1e6;
        if (ms - want).abs() > 0.0005 + want * 1e-12 {
            return Err(format!("duration_ms {ms} for {want}"));
        }
        let mut want = reference(r);
        if let Some(e) = r.error {
            want["error"] = e.into();
        }
        if v != want {
            return Err(format!("{v} != {want}"));
        }
        Ok(())
    }

    fn line(r: &Record) -> String {
        let mut out = Vec::new();
        format_line(&mut out, r, &mut Clock::default());
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let client: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let mut r = record("gate\"way\\\n\u{1}é", "/a?b=c", client, 1_500, t);
        r.endpoint = Some("[::1]:8080".parse().unwrap());
        let text = line(&r);
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        same_values(&text, &r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["service"], "gate\"way\\\n\u{1}é");
        assert_eq!(v["endpoint"], "[::1]:8080");
        assert!(text.contains("\"duration_ms\":0.002,"), "{text}");
        assert!(text.contains("\"error\":\"connect\"}"), "{text}");
        r.error = None;
        r.request_id = Some(HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let v: serde_json::Value = serde_json::from_str(&line(&r)).unwrap();
        assert!(v.get("error").is_none());
        assert!(
            v["request_id"].is_null(),
            "bytes that are not text are not guessed at"
        );
        assert_eq!(v["host"], "example.test");
    }

    #[test]
    fn durations_read_back_as_the_rounded_milliseconds() {
        let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (nanos, text) in [
            (0, "0.0"),
            (499, "0.0"),
            (500, "0.001"),
            (50_000, "0.05"),
            (500_000, "0.5"),
            (12_000_000, "12.0"),
            (3_042_000, "3.042"),
            (3_040_400, "3.04"),
            (86_400_000_000_000, "86400000.0"),
        ] {
            let r = record("s", "/", client, nanos, SystemTime::UNIX_EPOCH);
            let l = line(&r);
            assert!(
                l.contains(&format!("\"duration_ms\":{text},")),
                "{nanos}: {l}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn every_line_holds_the_values_serde_json_wrote(
            service in "\\PC{0,40}|[\\x00-\\x7f]{0,40}",
            path in "/[a-zA-Z0-9._~%!$&'()*+,;=:@/-]{0,20}",
            v4 in any::<[u8; 4]>(),
            v6 in any::<[u16; 8]>(),
            port in any::<u16>(),
            six in any::<bool>(),
            nanos in 0u64..10_000_000_000_000,
            ms in 0u64..253_402_300_799_999,
        ) {
            let client = if six {
                SocketAddr::from((std::net::Ipv6Addr::from(v6), port))
            } else {
                SocketAddr::from((v4, port))
            };
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            let r = record(&service, &path, client, nanos, t);
            let text = line(&r);
            if let Err(e) = same_values(&text, &r) {
                return Err(TestCaseError::fail(e));
            }
        }
    }

    #[test]
    fn eight_bytes_at_a_time_find_every_byte_that_needs_an_escape() {
        for c in 0..=255u8 {
            let want = c < 0x20 || c == b'"' || c == b'\\';
            for at in 0..8 {
                for fill in [b'a', 0x80, 0xff, b'!', b'#', b'['] {
                    let mut chunk = [fill; 8];
                    chunk[at] = c;
                    assert_eq!(
                        needs_escape(u64::from_le_bytes(chunk)),
                        want,
                        "{c:#x} at {at} in {fill:#x}"
                    );
                }
            }
        }
        let long = "a".repeat(21) + "\"" + &"b".repeat(9) + "\u{7}";
        let mut out = Vec::new();
        string(&mut out, &long);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, long);
    }

    #[test]
    fn the_clock_keeps_its_text_only_for_its_second() {
        let mut clock = Clock::default();
        let mut out = Vec::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_399_999);
        clock.write(&mut out, t);
        clock.write(&mut out, t + Duration::from_millis(1));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2000-02-28T23:59:59.999Z2000-02-29T00:00:00.000Z"
        );
    }
}
