//! HTTP/2 abuse with hand-made frames: rapid reset (CVE-2023-44487),
//! CONTINUATION and empty-DATA floods, PING and SETTINGS floods, malformed
//! pseudo-headers. Each abusive connection must be cut (or its streams
//! refused), nothing malformed may reach a backend, memory stays flat and a
//! well-behaved client is served meanwhile.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET http://a.example/`: static-table indices and one literal.
fn get_headers() -> Vec<u8> {
    let mut h = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
    h.push(0x41); // :authority, literal with incremental indexing (name index 1)
    h.push(9);
    h.extend_from_slice(b"a.example");
    h
}

/// An abusive connection: preface + empty SETTINGS already sent.
async fn h2_raw(proxy: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// Reads frames until the peer closes or sends GOAWAY (true), or `wait`
/// passes (false). Counts RST_STREAM frames received.
async fn until_cut(s: &mut TcpStream, wait: Duration) -> (bool, usize) {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut resets = 0;
    loop {
        let mut chunk = [0u8; 16384];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return (false, resets),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, resets),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            match buf[3] {
                GOAWAY => return (true, resets),
                RST_STREAM => resets += 1,
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
}

/// Writes frames until the peer stops reading (cut) or `limit` bytes went.
async fn flood(s: &mut TcpStream, mut next: impl FnMut(u32) -> Vec<u8>, limit: usize) -> usize {
    let mut sent = 0;
    let mut i = 0;
    while sent < limit {
        let f = next(i);
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&f)).await {
            Ok(Ok(())) => sent += f.len(),
            _ => break,
        }
        i += 1;
    }
    sent
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A well-behaved h2c client is served while `abuse` runs.
async fn served_during(proxy: std::net::SocketAddr, abuse: impl std::future::Future<Output = ()>) {
    let good = tokio::spawn(async move {
        let client = h2c_client();
        let mut ok = 0;
        for _ in 0..50 {
            let (s, _, _) = get(&client, proxy, "/", &[]).await;
            if s == 200 {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ok
    });
    abuse.await;
    assert_eq!(good.await.unwrap(), 50, "a normal client was hurt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let rss = rss_kib();
    served_during(proxy, async {
        let mut s = h2_raw(proxy).await;
        let headers = get_headers();
        let sent = flood(
            &mut s,
            |i| {
                let id = 1 + 2 * i;
                let mut f = frame(HEADERS, END_HEADERS | END_STREAM, id, &headers);
                f.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
                f
            },
            20_000 * 40,
        )
        .await;
        let (cut, _) = until_cut(&mut s, Duration::from_secs(5)).await;
        assert!(cut, "rapid reset was not cut after {sent} bytes");
    })
    .await;
    assert!(
        b.hits() < 2_000,
        "reset streams were forwarded: {}",
        b.hits()
    );
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 64 * 1024, "memory grew {grown} KiB");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let rss = rss_kib();
    served_during(proxy, async {
        let mut s = h2_raw(proxy).await;
        s.write_all(&frame(HEADERS, END_STREAM, 1, &get_headers()))
            .await
            .unwrap();
        // Endless CONTINUATION frames, never END_HEADERS, each a literal
        // header: the header block grows without bound unless cut.
        let mut junk = vec![0x40, 0x05];
        junk.extend_from_slice(b"x-pad");
        junk.push(0x7f);
        junk.push(0x81);
        junk.push(0x7f); // length 127 + 128 + ... (HPACK varint) = 16383-ish
        junk.extend(std::iter::repeat_n(b'a', 16_000));
        let sent = flood(
            &mut s,
            |_| frame(CONTINUATION, 0, 1, &junk),
            64 * 1024 * 1024,
        )
        .await;
        let (cut, _) = until_cut(&mut s, Duration::from_secs(5)).await;
        assert!(cut, "CONTINUATION flood not cut after {sent} bytes");
        assert!(
            sent < 16 * 1024 * 1024,
            "{sent} bytes accepted before the cut"
        );
    })
    .await;
    assert_eq!(
        b.hits(),
        50,
        "only the well-behaved client's requests reached the backend"
    );
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 64 * 1024, "memory grew {grown} KiB");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_flood_is_cut() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    served_during(proxy, async {
        let mut s = h2_raw(proxy).await;
        // A POST whose body is nothing but empty DATA frames.
        let mut h = vec![0x83, 0x86, 0x84, 0x41, 9];
        h.extend_from_slice(b"a.example");
        s.write_all(&frame(HEADERS, END_HEADERS, 1, &h))
            .await
            .unwrap();
        let sent = flood(&mut s, |_| frame(DATA, 0, 1, &[]), 4 * 1024 * 1024).await;
        let (cut, resets) = until_cut(&mut s, Duration::from_secs(5)).await;
        assert!(
            cut || resets > 0,
            "empty DATA flood neither cut nor reset after {sent} bytes"
        );
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_stay_bounded() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let rss = rss_kib();
    served_during(proxy, async {
        for kind in [PING, SETTINGS] {
            let mut s = h2_raw(proxy).await;
            // The flooder never reads: answers pile up on cyan's side unless
            // it stops reading or cuts the connection.
            let sent = flood(
                &mut s,
                |i| {
                    if kind == PING {
                        frame(PING, 0, 0, &(i as u64).to_be_bytes())
                    } else {
                        frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]) // MAX_CONCURRENT_STREAMS
                    }
                },
                32 * 1024 * 1024,
            )
            .await;
            eprintln!(
                "flood of {kind:#x} frames: {sent} bytes written before back-pressure or cut"
            );
        }
    })
    .await;
    let grown = rss_kib().saturating_sub(rss);
    assert!(
        grown < 64 * 1024,
        "memory grew {grown} KiB under PING/SETTINGS floods"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pseudo_headers_never_reach_a_backend() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let auth = |h: &mut Vec<u8>| {
        h.push(0x41);
        h.push(9);
        h.extend_from_slice(b"a.example");
    };
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Missing :method.
    let mut h = vec![0x86, 0x84];
    auth(&mut h);
    cases.push(("no :method", h));
    // Missing :path.
    let mut h = vec![0x82, 0x86];
    auth(&mut h);
    cases.push(("no :path", h));
    // A pseudo-header after a regular header.
    let mut h = vec![0x82, 0x86];
    auth(&mut h);
    h.extend_from_slice(&[0x40, 1, b'x', 1, b'y']); // x: y
    h.push(0x84); // :path after it
    cases.push(("pseudo after regular", h));
    // An unknown pseudo-header.
    let mut h = vec![0x82, 0x86, 0x84];
    auth(&mut h);
    h.extend_from_slice(&[0x40, 4]);
    h.extend_from_slice(b":bad");
    h.extend_from_slice(&[1, b'1']);
    cases.push(("unknown pseudo", h));
    // An uppercase header name.
    let mut h = vec![0x82, 0x86, 0x84];
    auth(&mut h);
    h.extend_from_slice(&[0x40, 3]);
    h.extend_from_slice(b"Bad");
    h.extend_from_slice(&[1, b'1']);
    cases.push(("uppercase name", h));
    // A connection-specific header.
    let mut h = vec![0x82, 0x86, 0x84];
    auth(&mut h);
    h.extend_from_slice(&[0x40, 10]);
    h.extend_from_slice(b"connection");
    h.extend_from_slice(&[5]);
    h.extend_from_slice(b"close");
    cases.push(("connection header", h));
    for (name, block) in cases {
        let mut s = h2_raw(proxy).await;
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
            .await
            .unwrap();
        let (cut, resets) = until_cut(&mut s, Duration::from_secs(3)).await;
        assert!(cut || resets > 0, "{name}: neither reset nor cut");
    }
    assert_eq!(
        b.hits() + g.hits(),
        0,
        "a malformed request reached a backend"
    );
    // And a well-formed one on a fresh connection works.
    let (s, _, _) = get(&h2c_client(), proxy, "/", &[]).await;
    assert_eq!(s, 200);
    server.shutdown().await;
}
