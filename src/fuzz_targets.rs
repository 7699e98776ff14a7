//! Entry points for the fuzzers in `fuzz/` (cargo-fuzz), shared with the
//! seed-corpus replay in `tests/fuzz_corpus.rs` so plain `cargo test` runs
//! every committed seed through exactly the code the fuzzers exercise.
//!
//! Each entry panics only when an invariant breaks; bad input itself must be
//! handled (an error value), never a panic.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::table::{Applied, Change, Command, Table};

/// The config parser and validator.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = Config::parse(text) {
            // A valid config always builds a table.
            assert!(
                Table::new(&cfg, Metrics::new()).is_ok(),
                "valid config, table refused"
            );
        }
    }
}

/// Admin request decoding: `METHOD PATH[?QUERY]\n BODY`.
pub fn admin_request(data: &[u8]) {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, target) = head.split_once(' ').unwrap_or(("GET", &head));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    match crate::admin::decode(&method, path, query, body) {
        Ok(op) => {
            if op.mutating() {
                assert!(method != Method::GET, "a GET decoded to a change: {op:?}");
            }
        }
        Err(r) => assert!(
            r.status.is_client_error(),
            "decode refused with {}",
            r.status
        ),
    }
}

const TABLE_BASE: &str = r#"
[[listener]]
name = "l"
listen = "127.0.0.1:0"
[[service]]
name = "gateway"
candidate_percent = 10
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"] }
green = { endpoints = ["127.0.0.1:9001"] }
"#;

/// A sequence of commands (4 bytes each) applied to a table; a refused
/// command must change nothing, and every live table must be consistent.
pub fn table_apply(data: &[u8]) {
    let Ok(cfg) = Config::parse(TABLE_BASE) else {
        return;
    };
    let Ok(table) = Table::new(&cfg, Metrics::new()) else {
        return;
    };
    let addrs: [SocketAddr; 4] = [
        ([127, 0, 0, 1], 8001).into(),
        ([127, 0, 0, 1], 8002).into(),
        ([127, 0, 0, 1], 9001).into(),
        ([127, 0, 0, 1], 1).into(),
    ];
    for c in data.chunks_exact(4) {
        let service = if c[1] & 0x80 == 0 { "gateway" } else { "other" }.to_string();
        let v = u16::from_le_bytes([c[2], c[3]]);
        let addr = addrs[(c[1] & 3) as usize];
        let color = if c[1] & 4 == 0 {
            crate::config::Color::Blue
        } else {
            crate::config::Color::Green
        };
        let cmd = match c[0] % 11 {
            0 => Command::SetSplit {
                service,
                candidate_bp: v,
            },
            1 => Command::Promote { service },
            2 => Command::Rollback { service },
            3 => Command::SetDrained {
                service,
                addr,
                drained: v & 1 == 1,
            },
            4 => Command::SetHealth {
                service,
                color,
                addr,
                healthy: v & 1 == 1,
            },
            5 => Command::AutoRollback {
                service,
                to_bp: v,
                reason: "fuzz".into(),
                at_ms: 1,
            },
            6 => Command::RolloutStart {
                service,
                steps: c[2..].iter().map(|&b| u16::from(b) * 50).collect(),
                at_ms: 1,
            },
            7 => Command::RolloutAdvance {
                service,
                step: usize::from(c[2]),
                at_ms: 2,
            },
            8 => Command::RolloutPause { service, at_ms: 3 },
            9 => Command::RolloutResume { service, at_ms: 4 },
            _ => Command::RolloutAbort {
                service,
                reason: "fuzz".into(),
            },
        };
        let before = table.load();
        let if_gen = (c[1] & 0x40 != 0).then_some(u64::from(c[3] % 4));
        match table.apply(Change::from(cmd).if_generation(if_gen)) {
            Err(_) | Ok(Applied::NoChange { .. }) => {
                assert!(
                    std::sync::Arc::ptr_eq(&before, &table.load()),
                    "a refused command changed the table"
                )
            }
            Ok(Applied::Changed { generation }) => assert_eq!(generation, before.generation + 1),
        }
        let t = table.load();
        for s in &t.services {
            assert!(s.split.candidate_bp <= 10_000);
            for p in &s.pools {
                let n = p.endpoints.iter().filter(|e| e.eligible()).count();
                assert_eq!(n, p.eligible.len());
            }
        }
    }
}

/// The request checks and header hygiene over an arbitrary header block
/// (`name: value` lines).
pub fn headers(data: &[u8]) {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.headers_mut() = map.clone();
    let _ = crate::headers::check_request(&req, 64 * 1024);
    let upgrade = crate::headers::is_upgrade_request(&map, http::Version::HTTP_11);
    let mut stripped = map.clone();
    crate::headers::strip_hop_by_hop(&mut stripped, upgrade);
    for gone in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        assert!(!stripped.contains_key(gone), "{gone} survived stripping");
    }
    if !upgrade {
        assert!(!stripped.contains_key("connection") && !stripped.contains_key("upgrade"));
    }
    if let Some(te) = stripped.get("te") {
        assert_eq!(te, "trailers");
    }
    let listener = Config::parse(TABLE_BASE)
        .ok()
        .map(|c| c.listeners[0].clone());
    if let Some(l) = listener {
        let _ = crate::headers::client_ip(&map, [192, 0, 2, 1].into(), &l);
    }
    crate::headers::set_forwarding(&mut stripped, [192, 0, 2, 1].into(), false, false, "h");
    assert_eq!(
        stripped.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"192.0.2.1"[..])
    );
    let id = crate::headers::ensure_request_id(&mut stripped);
    assert!(!id.is_empty());
}

/// cyan's own HTTP/1.1 request-head parser ([`crate::h1server::parse`]): a
/// head is taken only when it is a plain bodiless GET or HEAD, and the
/// bytes of anything else come back untouched (hyper then reads them).
pub fn h1_request_head(data: &[u8]) {
    match crate::h1server::parse(bytes::BytesMut::from(data)) {
        Err(back) => assert_eq!(&back[..], data, "bytes given back changed"),
        Ok(p) => {
            assert!(p.parts.method == Method::GET || p.parts.method == Method::HEAD);
            assert!(data.ends_with(&p.rest), "the rest is not the input's tail");
            assert!(p.rest.len() < data.len());
            for refused in ["transfer-encoding", "upgrade", "expect"] {
                assert!(!p.parts.headers.contains_key(refused), "{refused} taken");
            }
            for cl in p.parts.headers.get_all("content-length") {
                assert_eq!(cl, "0", "a body-bearing request taken");
            }
            assert!(p.parts.uri.path().starts_with('/'));
        }
    }
}

/// cyan's own HTTP/1.1 response-head parser ([`crate::h1client`]): no
/// panic, a head never longer than its input, and a framing that agrees
/// with the head (see [`crate::h1client::parse_response_head`]).
pub fn h1_response_head(data: &[u8]) {
    for head_request in [false, true] {
        crate::h1client::parse_response_head(data, head_request);
    }
}
