//! End-to-end scenarios of what cyan refuses and when it gives up: malformed
//! and smuggling-shaped requests, every timeout, the connection cap, and
//! upstream TLS.
//!
//! Timeouts are configured short (a few hundred ms) and each test checks the
//! elapsed time lands near the configured value, far below the defaults
//! (seconds), so a setting that is not wired through fails the test.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Version};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status code of a raw HTTP/1.1 response, 0 when there is none.
fn status_of(raw: &str) -> u16 {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `elapsed` is at least `configured` (minus timer slack) and well below
/// `configured + margin`.
fn assert_near(what: &str, elapsed: Duration, configured: Duration, margin: Duration) {
    assert!(
        elapsed + Duration::from_millis(50) >= configured && elapsed < configured + margin,
        "{what}: took {elapsed:?}, configured {configured:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_shaped_requests_never_reach_a_backend() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let big = format!("X-Big: {}\r\n", "x".repeat(70_000));
    let cases: Vec<(&str, String, u16)> = vec![
        ("missing Host", "GET / HTTP/1.1\r\n\r\n".into(), 400),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".into(),
            400,
        ),
        (
            "TE chunked, chunked",
            "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "TE gzip, chunked",
            "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "two TE headers",
            "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "conflicting Content-Length",
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
            400,
        ),
        (
            "CONNECT",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n".into(),
            405,
        ),
        (
            "70 KB header",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{big}\r\n"),
            431,
        ),
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n".into(),
            400,
        ),
        (
            "Host with a space",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n".into(),
            400,
        ),
        (
            "Host with userinfo",
            "GET / HTTP/1.1\r\nHost: user@x\r\n\r\n".into(),
            400,
        ),
        (
            "absolute-form differing from Host",
            "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n".into(),
            400,
        ),
    ];
    for (what, raw, expected) in &cases {
        let out = raw_outcome(proxy, raw.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&out.text), *expected, "{what}: {}", out.text);
        assert!(
            out.closed,
            "{what}: the connection is closed after a refusal"
        );
    }
    assert_eq!(
        b.hits() + g.hits(),
        0,
        "no refused request reached a backend"
    );
    // The ones cyan itself refused are counted (the rest hyper refused while
    // parsing, before cyan saw a request).
    assert_eq!(
        metric(&server, "cyan_rejected_requests_total", &["code=\"400\""]),
        8.0
    );
    assert_eq!(
        metric(&server, "cyan_rejected_requests_total", &["code=\"405\""]),
        1.0
    );
    // A well-formed request on the same proxy still works.
    let out = raw_outcome(
        proxy,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_of(&out.text), 200, "{}", out.text);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_framed_by_te_and_closes() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let hello = digest_hex(b"hello");
    // Content-Length says 3, the chunked body is 5 bytes; both orders.
    for headers in [
        "Content-Length: 3\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 3",
    ] {
        let req = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\n{headers}\r\n{DIGEST}: {hello}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let out = raw_outcome(proxy, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&out.text), 200, "{}", out.text);
        assert!(
            out.text.ends_with(&format!("{hello} 5")),
            "the backend got the 5 chunked bytes: {}",
            out.text
        );
        assert!(out.closed, "connection closed after the response");
        assert!(
            out.elapsed < Duration::from_secs(2),
            "closed, not timed out"
        );

        let req = format!(
            "POST /echo-headers HTTP/1.1\r\nHost: a\r\n{headers}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let out = raw_outcome(proxy, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(status_of(&out.text), 200, "{}", out.text);
        let echoed = out.text.split("\r\n\r\n").nth(1).unwrap_or("");
        // The client's Content-Length is gone. The body, read whole ahead
        // of the upstream (request_buffer_bytes), goes up framed by its
        // true length; unbuffered it would go chunked.
        assert!(
            !echoed.contains("content-length: 3"),
            "the client's Content-Length removed: {echoed}"
        );
        assert!(
            echoed.contains("content-length: 5\n")
                != echoed.contains("transfer-encoding: chunked\n"),
            "sent upstream framed by the 5 chunked bytes: {echoed}"
        );
        assert!(out.closed && out.elapsed < Duration::from_secs(2));
    }
    assert_eq!(b.hits(), 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_host_differing_from_authority_is_refused() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let send = |host: &'static str| async move {
        let tcp = TcpStream::connect(proxy).await.unwrap();
        let req = Request::get("http://a.example/")
            .header("host", host)
            .body(empty())
            .unwrap();
        h2_send(tcp, req).await.expect("h2 exchange")
    };
    let resp = send("b.example").await;
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 400);
    assert_eq!(b.hits(), 0);
    // The same request with a matching host goes through.
    let resp = send("a.example").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.hits(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_timeout_closes_a_silent_client() {
    let dir = TempDir::new("hs");
    let cert = TestCert::generate(dir.path(), "default", &["default.test"]);
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = format!(
        "tls = {{ {} }}\nhandshake_timeout = \"400ms\"",
        cert.toml_pair()
    );
    let cfg = config(&custom_config(0.0, &listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let errors = || metric(&server, "cyan_tls_handshake_errors_total", &[]);
    assert_eq!(errors(), 0.0);
    let out = raw_outcome(proxy, b"", Duration::from_secs(5)).await;
    assert!(out.closed, "cyan closed the silent connection");
    assert!(out.text.is_empty());
    assert_near(
        "handshake timeout",
        out.elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );
    eprintln!("handshake_timeout 400ms: closed after {:?}", out.elapsed);
    assert!(eventually(Duration::from_secs(2), || errors() == 1.0).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_head_is_cut_at_header_timeout() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = "header_timeout = \"400ms\"\nidle_timeout = \"10s\"";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let s = TcpStream::connect(proxy).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let start = Instant::now();
    wr.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // Keep the head coming, a header every 50 ms, never finishing it (at
    // most 100 of them: 5 s).
    let writer = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if wr
                .write_all(format!("X-T{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
    let elapsed = start.elapsed();
    writer.abort();
    assert!(read.is_ok(), "connection not closed within 5 s");
    assert_near(
        "header timeout",
        elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );
    eprintln!("header_timeout 400ms (trickled head): closed after {elapsed:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || status_of(&text) == 408,
        "nothing or a 408: {text}"
    );
    assert_eq!(b.hits(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_gets_408_at_body_idle_timeout() {
    // Buffered (the default): the body stalls while cyan reads it ahead,
    // so no upstream ever sees the request. Unbuffered: it stalls on its
    // way upstream. Both end in a 408 at the timeout.
    for (buffer, upstream_hits) in [("", 0), ("request_buffer_bytes = 0", 1)] {
        let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
        let listener = format!("body_idle_timeout = \"400ms\"\n{buffer}");
        let cfg = config(&custom_config(0.0, &listener, "", "", ""), &[&b], &[&g]);
        let (server, proxy) = start_proxy(&cfg).await;
        let req = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n0123456789";
        let out = raw_outcome(proxy, req, Duration::from_secs(5)).await;
        assert_eq!(status_of(&out.text), 408, "{buffer:?}: {}", out.text);
        assert!(out.closed, "the connection is closed after a 408");
        assert_near(
            "body idle timeout",
            out.elapsed,
            Duration::from_millis(400),
            Duration::from_millis(1200),
        );
        eprintln!(
            "body_idle_timeout 400ms ({buffer:?}): 408 after {:?}",
            out.elapsed
        );
        assert_eq!(b.hits(), upstream_hits, "{buffer:?}: requests upstream");
        assert_eq!(
            metric(&server, "cyan_rejected_requests_total", &["code=\"408\""]),
            if upstream_hits == 0 { 1.0 } else { 0.0 },
            "{buffer:?}: a 408 cyan gave before any upstream is its own refusal"
        );
        server.shutdown().await;
    }
}

/// Writes `head` and `first` on a fresh connection, waits, and returns the
/// connection with the backend's request count by then.
async fn part_sent(proxy: SocketAddr, head: &str, first: &[u8], b: &Backend) -> (TcpStream, usize) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (s, b.hits())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_is_read_whole_before_any_upstream_is_taken() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let digest = digest_hex(&body);
    // Content-Length: half the body, a pause, the rest.
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\n{DIGEST}: {digest}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (mut s, hits) = part_sent(proxy, &head, &body[..5000], &b).await;
    assert_eq!(hits, 0, "no upstream request while the body is incomplete");
    s.write_all(&body[5000..]).await.unwrap();
    let r = read_one_response(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with(&format!("{digest} 10000")), "{r}");
    // Chunked, with the last chunk after a pause: the same, and the body
    // goes up whole.
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\n{DIGEST}: {digest}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut first = format!("{:x}\r\n", 6000).into_bytes();
    first.extend_from_slice(&body[..6000]);
    first.extend_from_slice(b"\r\n");
    let (mut s, hits) = part_sent(proxy, &head, &first, &b).await;
    assert_eq!(hits, 1, "only the first request so far");
    let mut rest = format!("{:x}\r\n", 4000).into_bytes();
    rest.extend_from_slice(&body[6000..]);
    rest.extend_from_slice(b"\r\n0\r\n\r\n");
    s.write_all(&rest).await.unwrap();
    let r = read_one_response(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with(&format!("{digest} 10000")), "{r}");
    assert_eq!(b.hits(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_its_interim_answer_then_the_body_goes_up() {
    // The client waits for 100 Continue before sending its body; reading
    // the body ahead is what asks hyper to send it, so the body comes and
    // goes up whole. Buffered and unbuffered alike.
    for buffer in ["", "request_buffer_bytes = 0"] {
        let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
        let cfg = config(&custom_config(0.0, buffer, "", "", ""), &[&b], &[&g]);
        let (server, proxy) = start_proxy(&cfg).await;
        let body = b"hello expect";
        let digest = digest_hex(body);
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n{DIGEST}: {digest}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{buffer:?}: no 100 Continue"))
                .unwrap();
            assert!(n > 0, "{buffer:?}: closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        let interim = String::from_utf8_lossy(&got).into_owned();
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{buffer:?}: {interim}"
        );
        s.write_all(body).await.unwrap();
        let r = read_one_response(&mut s, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{buffer:?}: {r}");
        assert!(
            r.ends_with(&format!("{digest} {}", body.len())),
            "{buffer:?}: {r}"
        );
        assert_eq!(b.hits(), 1);
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_buffer_or_grpc_or_unbuffered_streams() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = "request_buffer_bytes = 4096";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let digest = digest_hex(&body);
    let head = |extra: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\n{DIGEST}: {digest}\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
    };
    // Past the 4 KiB buffer: the request goes up with the first bytes and
    // the rest streams behind them.
    let (mut s, hits) = part_sent(proxy, &head(""), &body[..5000], &b).await;
    assert_eq!(hits, 1, "on its way upstream once the buffer is full");
    s.write_all(&body[5000..]).await.unwrap();
    let r = read_one_response(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.ends_with(&format!("{digest} 100000")), "{r}");
    // gRPC streams from the first byte: its server may answer early.
    let (mut s, hits) = part_sent(
        proxy,
        &head("Content-Type: application/grpc\r\n"),
        &body[..10],
        &b,
    )
    .await;
    assert_eq!(hits, 2, "gRPC is never held back");
    s.write_all(&body[10..]).await.unwrap();
    let r = read_one_response(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.ends_with(&format!("{digest} 100000")), "{r}");
    server.shutdown().await;

    // Buffering off: every body streams from its first byte.
    let cfg = config(
        &custom_config(0.0, "request_buffer_bytes = 0", "", "", ""),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let (mut s, hits) = part_sent(proxy, &head(""), &body[..10], &b).await;
    assert_eq!(hits, 3, "unbuffered: upstream at once");
    s.write_all(&body[10..]).await.unwrap();
    let r = read_one_response(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.ends_with(&format!("{digest} 100000")), "{r}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_broken_off_while_buffered_reaches_no_upstream() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    // The client goes away halfway through its body.
    let head = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n";
    let (s, _) = part_sent(proxy, head, b"0123456789", &b).await;
    drop(s);
    // Broken chunked framing halfway through.
    let bad = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let out = raw_outcome(proxy, bad, Duration::from_secs(2)).await;
    assert!(
        out.text.is_empty() || status_of(&out.text) == 400,
        "nothing or a 400: {}",
        out.text
    );
    assert!(out.closed, "the connection is closed");
    assert!(
        eventually(Duration::from_secs(2), || metric(
            &server,
            "cyan_rejected_requests_total",
            &["code=\"400\""]
        ) == 2.0)
        .await,
        "both counted as refused by cyan"
    );
    assert_eq!(b.hits(), 0, "neither reached the backend");
    assert_eq!(
        metric(&server, "cyan_upstream_errors_total", &[]),
        0.0,
        "a client's broken body is not an upstream failure"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_at_idle_timeout() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // header_timeout longer than idle_timeout, so only the idle watchdog can
    // close these connections this early.
    let listener = "idle_timeout = \"400ms\"\nheader_timeout = \"5s\"";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;

    // A connection that never sends anything.
    let out = raw_outcome(proxy, b"", Duration::from_secs(5)).await;
    assert!(out.closed && out.text.is_empty());
    assert_near(
        "idle (no request)",
        out.elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );
    eprintln!(
        "idle_timeout 400ms, fresh connection: closed after {:?}",
        out.elapsed
    );

    // A keep-alive connection after one request.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let resp = read_one_response(&mut s, Duration::from_secs(3))
        .await
        .expect("a response, connection kept open");
    assert_eq!(status_of(&resp), 200);
    let out = exchange_on(&mut s, b"", Duration::from_secs(5)).await;
    assert!(out.closed && out.text.is_empty(), "{}", out.text);
    assert_near(
        "idle (keep-alive)",
        out.elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );
    eprintln!(
        "idle_timeout 400ms, after a request: closed after {:?}",
        out.elapsed
    );

    // Requests 250 ms apart for over a second: each wait's timer starts
    // anew (a timer left at its first deadline would cut the connection
    // 400 ms in), and the close still comes 400 ms after the last.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let resp = read_one_response(&mut s, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("request {i} 250 ms after the last: no response"));
        assert_eq!(status_of(&resp), 200);
    }
    let out = exchange_on(&mut s, b"", Duration::from_secs(5)).await;
    assert!(out.closed && out.text.is_empty(), "{}", out.text);
    assert_near(
        "idle (after spaced requests)",
        out.elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );

    // HTTP/2: the idle connection is ended (GOAWAY, then close).
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::get(format!("http://{proxy}/"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body_text(resp).await;
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "h2 connection not ended by the idle timeout");
    assert_near(
        "idle (h2)",
        start.elapsed(),
        Duration::from_millis(400),
        Duration::from_millis(1200),
    );
    eprintln!("idle_timeout 400ms, h2: ended after {:?}", start.elapsed());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_reset_at_send_timeout() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = "send_timeout = \"400ms\"\nidle_timeout = \"10s\"";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (mut s, len) = never_read_download(proxy).await;
    let start = Instant::now();
    let client_port = s.local_addr().unwrap().port();
    let open = || metric(&server, "cyan_connections_open", &[]);
    assert!(eventually(Duration::from_secs(1), || open() == 1.0).await);
    // cyan's end of the connection, its send queue full.
    let proxy_side = || tcp_row(proxy.port(), client_port);
    assert!(
        eventually(Duration::from_secs(1), || proxy_side()
            .is_some_and(|r| r.tx_queue > 0))
        .await,
        "cyan's socket never held unsent bytes: {:?}",
        proxy_side()
    );
    // Never read: the response stalls, and the proxy drops the connection.
    assert!(
        eventually(Duration::from_secs(5), || open() == 0.0).await,
        "a connection nobody reads from is still open after 5 s"
    );
    let elapsed = start.elapsed();
    assert_near(
        "send timeout",
        elapsed,
        Duration::from_millis(400),
        Duration::from_millis(1500),
    );
    eprintln!("send_timeout 400ms: dropped {elapsed:?} after the request");
    // Reset, not closed: no orphaned socket is left in the kernel holding
    // the unsent bytes (a plain close leaves it in FIN_WAIT1, probing the
    // zero window for minutes).
    assert!(
        eventually(Duration::from_secs(1), || proxy_side().is_none()).await,
        "cyan's socket outlived the drop: {:?}",
        proxy_side()
    );
    // What had reached the client is still readable; then the reset, never
    // a clean end that could pass for a complete response.
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Err(e) => return Some(e.kind()),
                Ok(n) => total += n as u64,
            }
        }
    })
    .await
    .expect("the client's read neither failed nor ended");
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "after {total} bytes"
    );
    assert!(total > 0 && total < len / 4, "read {total} of {len} bytes");
    server.shutdown().await;
}

/// While an HTTP/1.1 client's socket is full, cyan stops taking body chunks
/// from the upstream: hyper would otherwise queue up to its `max_buf_size`
/// (64 KiB here) of chunks, each read from the upstream first, for a client
/// that is not reading. What cyan took from the body (`bytes_out` in the
/// access log) may exceed what it wrote to the client's socket (what the
/// client received plus cyan's send queue) by at most the chunks taken in
/// the turn in which the socket filled: two reads of 16 KiB (measured
/// 17.3 KiB; 65.3 KiB with the hold switched off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_holds_one_chunk_not_a_write_queue() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let log = TempDir::new("held-body");
    let path = log.path().join("access.log");
    let template = format!(
        "[access_log]\npath = \"{}\"\n{}",
        path.display(),
        custom_config(0.0, "send_timeout = \"800ms\"", "", "", "")
    );
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (mut s, _) = never_read_download(proxy).await;
    let client_port = s.local_addr().unwrap().port();
    let open = || metric(&server, "cyan_connections_open", &[]);
    assert!(eventually(Duration::from_secs(1), || open() == 1.0).await);
    // Stalled: both ends' queues stop moving. What cyan wrote to the
    // socket is the client's receive queue plus cyan's send queue (the
    // drop resets the connection and discards the latter).
    let (unsent, _) = stalled_queues(proxy.port(), client_port).await;
    assert!(
        eventually(Duration::from_secs(5), || open() == 0.0).await,
        "the stalled download was not dropped at send_timeout"
    );
    // What reached the client is still readable, then the reset.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "no end after the drop");
    let head = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .expect("a response head arrived");
    let written = (got.len() - head) as u64 + unsent;
    server.shutdown().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("one access log line")).unwrap();
    let taken = line["bytes_out"].as_u64().expect("bytes_out");
    eprintln!(
        "stalled download: {taken} bytes taken from the upstream body, {written} written to the socket ({unsent} of them unsent)"
    );
    assert!(taken >= written, "{taken} taken < {written} written");
    assert!(
        taken - written <= 2 * 16 * 1024,
        "{} bytes were held for a client that was not reading (taken {taken}, written {written})",
        taken - written
    );
}

/// `notsent_lowat_bytes` reaches the client sockets: a client that stops
/// reading leaves at most about 16 KiB unsent in cyan's send queue by
/// default, and `0` hands the queue back to the kernel's autotuning (~100
/// KiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notsent_lowat_bounds_what_a_stalled_client_queues() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // The low-water mark plus the one write that crossed it, plus what the
    // client's 4 KiB window has in flight.
    let bound = 16_384 + 16_384 + 8_192;
    for (setting, bounded) in [("", true), ("notsent_lowat_bytes = 0", false)] {
        let listener = format!("send_timeout = \"10s\"\n{setting}");
        let cfg = config(&custom_config(0.0, &listener, "", "", ""), &[&b], &[&g]);
        let (server, proxy) = start_proxy(&cfg).await;
        let (s, _) = never_read_download(proxy).await;
        let client_port = s.local_addr().unwrap().port();
        let (queued, _) = stalled_queues(proxy.port(), client_port).await;
        eprintln!("[{setting}]: {queued} bytes queued in cyan's socket");
        if bounded {
            assert!(
                queued <= bound,
                "default: {queued} bytes queued for a client that is not reading"
            );
        } else {
            assert!(
                queued > bound,
                "with the kernel's setting only {queued} bytes queued: is the default applied regardless?"
            );
        }
        drop(s);
        server.shutdown().await;
    }
}

/// Waits (up to 750 ms) until cyan's socket to a client that does not read
/// holds bytes and neither end's queue moves any more; returns cyan's send
/// queue and the client's receive queue then.
async fn stalled_queues(proxy_port: u16, client_port: u16) -> (u64, u64) {
    let queues = || {
        let cyan = tcp_row(proxy_port, client_port)?;
        let client = tcp_row(client_port, proxy_port)?;
        Some((cyan.tx_queue, client.rx_queue))
    };
    let mut last = None;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = queues();
        if let Some(q) = now.filter(|&(tx, _)| tx > 0 && now == last) {
            return q;
        }
        last = now;
    }
    panic!("the download never stalled: queues {last:?}");
}

/// The socket with these local and remote ports, if the kernel still has
/// it (TIME_WAIT rows, which hold no data, are skipped).
fn tcp_row(local_port: u16, remote_port: u16) -> Option<TcpRow> {
    tcp_rows().into_iter().find(|r| {
        r.local_port == local_port && r.remote_port == remote_port && r.state != TCP_TIME_WAIT
    })
}

/// Asks for a 256 MiB download on a [`small_window_connect`] socket that
/// the caller then does not read: the proxy's writes stall at once.
async fn never_read_download(proxy: SocketAddr) -> (TcpStream, u64) {
    let mut s = small_window_connect(proxy).await.unwrap();
    let len: u64 = 256 << 20;
    s.write_all(format!("GET /big/{len} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    (s, len)
}

/// Asks for `n` generated bytes and reads them in bursts of 64 KiB with a
/// pause after each, so the proxy's socket fills and drains again and
/// again; checks every byte. Returns how long it took.
async fn stop_and_go_download<S>(mut s: S, n: u64) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = Instant::now();
    s.write_all(
        format!("GET /big/{n} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    // The head's bytes until its end has arrived.
    let mut head = Vec::new();
    let mut head_done = false;
    let mut got = 0u64;
    let mut burst = 0usize;
    let mut in_order = true;
    loop {
        let k = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => k,
            Err(_) => panic!("the download stalled for 5 s after {got} of {n} body bytes"),
        };
        burst += k;
        let body: &[u8] = if head_done {
            &buf[..k]
        } else {
            head.extend_from_slice(&buf[..k]);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            head_done = true;
            &head[end + 4..]
        };
        for (i, b) in body.iter().enumerate() {
            in_order &= *b == Generated::byte(got + i as u64);
        }
        got += body.len() as u64;
        if burst >= 64 * 1024 {
            burst = 0;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    assert_eq!(got, n, "every body byte arrived");
    assert!(in_order, "the bytes arrived intact and in order");
    start.elapsed()
}

/// The hold on a full socket never strands a response: a client that reads
/// in bursts with pauses gets every byte, in plain HTTP/1.1 and over TLS
/// (where the bytes wait in the TLS layer, below hyper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_and_go_reader_gets_every_byte_plain_and_tls() {
    let dir = TempDir::new("stop-and-go");
    let cert = TestCert::generate(dir.path(), "tls", &["localhost"]);
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = format!("tls = {{ {} }}", cert.toml_pair());
    let plain_cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let tls_cfg = config(&custom_config(0.0, &listener, "", "", ""), &[&b], &[&g]);
    let (plain, plain_addr) = start_proxy(&plain_cfg).await;
    let (tls, tls_addr) = start_proxy(&tls_cfg).await;
    let n = 4 << 20;
    let took = stop_and_go_download(small_window_connect(plain_addr).await.unwrap(), n).await;
    eprintln!("plain: {n} bytes in {took:?}");
    let tcp = small_window_connect(tls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls_connector_any().connect(name, tcp).await.expect("TLS");
    let took = stop_and_go_download(stream, n).await;
    eprintln!("TLS: {n} bytes in {took:?}");
    for server in [&plain, &tls] {
        assert!(
            eventually(Duration::from_secs(2), || {
                metric(server, "cyan_requests_total", &["2xx"]) == 1.0
            })
            .await,
            "the download is accounted for as complete"
        );
    }
    plain.shutdown().await;
    tls.shutdown().await;
}

/// `read_buffer_bytes` is the largest read from an HTTP/1.1 upstream, so
/// also the largest response head cyan accepts: past it a 502 (HAProxy and
/// nginx answer the same to a head bigger than their buffer). A pool can
/// raise it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_heads_are_bounded_by_the_read_buffer() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let get_status = |proxy: SocketAddr, path: &'static str| async move {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let out = raw_exchange(proxy, req.as_bytes(), Duration::from_secs(5)).await;
        (status_of(&out), out)
    };
    // The default, 16 KiB.
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, out) = get_status(proxy, "/fat-head/12000").await;
    assert_eq!(status, 200, "{}", &out[..out.len().min(300)]);
    assert!(
        out.contains(&"h".repeat(12_000)),
        "the long header arrived whole"
    );
    let (status, out) = get_status(proxy, "/fat-head/20000").await;
    assert_eq!(status, 502, "{}", &out[..out.len().min(300)]);
    assert!(
        !out.contains("hhhhhhhh"),
        "no part of the refused head reached the client"
    );
    let (status, _) = get_status(proxy, "/fat-head/12000").await;
    assert_eq!(status, 200, "the proxy serves on after the refused head");
    server.shutdown().await;

    // Raised on the pool.
    let cfg = config(
        &custom_config(0.0, "", "", ", read_buffer_bytes = 65536", ""),
        &[&b],
        &[&g],
    );
    assert_eq!(cfg.services[0].blue.upstream.read_buffer_bytes, 65_536);
    assert_eq!(cfg.services[0].green.upstream.read_buffer_bytes, 16_384);
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, out) = get_status(proxy, "/fat-head/40000").await;
    assert_eq!(status, 200, "{}", &out[..out.len().min(300)]);
    assert!(out.contains(&"h".repeat(40_000)));
    server.shutdown().await;
}

/// A loopback listener whose accept queue is full: new connects hang (the
/// kernel drops their SYNs). Keep the returned values alive.
async fn blackhole() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    let mut full = false;
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("connect to the never-accepting listener failed: {e}"),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(
        full,
        "the accept queue never filled: connects to a full backlog do not hang on this kernel"
    );
    (sock, fillers, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_gives_504() {
    let (_sock, _fillers, hole) = blackhole().await;
    let template = custom_config(
        0.0,
        "",
        "upstream = { connect_timeout = \"300ms\" }",
        "",
        "",
    )
    .replace("[{blue}]", &format!("[\"{hole}\"]"))
    .replace("[{green}]", &format!("[\"{hole}\"]"));
    let cfg = config(&template, &[], &[]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let start = Instant::now();
    let (status, _, body) = get(&client, proxy, "/", &[]).await;
    let elapsed = start.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("connect timed out"), "{body}");
    // One attempt per color, each cut at connect_timeout (default: 3 s).
    assert_near(
        "connect timeout (2 attempts)",
        elapsed,
        Duration::from_millis(600),
        Duration::from_millis(1200),
    );
    eprintln!("connect_timeout 300ms, two attempts: 504 after {elapsed:?}");
    assert_eq!(
        metric(&server, "cyan_upstream_errors_total", &["kind=\"timeout\""]),
        2.0
    );
    assert_eq!(metric(&server, "cyan_retries_total", &[]), 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_timeout_per_pool() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // The service default is long; the blue pool overrides it.
    let cfg = config(
        &custom_config(
            0.0,
            "",
            "upstream = { response_timeout = \"20s\" }",
            ", response_timeout = \"300ms\"",
            "",
        ),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let start = Instant::now();
    let (status, _, body) = get(&client, proxy, "/delay/3000", &[]).await;
    let elapsed = start.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("response timed out"), "{body}");
    assert_near(
        "response timeout",
        elapsed,
        Duration::from_millis(300),
        Duration::from_millis(1000),
    );
    eprintln!("response_timeout 300ms: 504 after {elapsed:?}");
    // Sent, so not retried on green.
    assert_eq!(g.hits(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_new_connections_in_the_backlog() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = "max_connections = 2";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut first = TcpStream::connect(proxy).await.unwrap();
    let mut second = TcpStream::connect(proxy).await.unwrap();
    for s in [&mut first, &mut second] {
        s.write_all(req).await.unwrap();
        let r = read_one_response(s, Duration::from_secs(3)).await;
        assert_eq!(r.as_deref().map(status_of), Some(200));
    }
    assert!(
        eventually(Duration::from_secs(2), || metric(
            &server,
            "cyan_connections_open",
            &[]
        ) == 2.0)
        .await
    );

    // The third connection completes in the kernel but is not accepted.
    let mut third = TcpStream::connect(proxy).await.unwrap();
    third.write_all(req).await.unwrap();
    let busy_before = runtime_busy();
    let waited = read_one_response(&mut third, Duration::from_millis(300)).await;
    let busy = runtime_busy().saturating_sub(busy_before);
    assert!(waited.is_none(), "answered over the cap: {waited:?}");
    // Waiting for a permit is not a spin: the runtime stays mostly parked.
    assert!(
        busy < Duration::from_millis(60),
        "runtime busy {busy:?} in 300 ms"
    );
    eprintln!("max_connections: third connection waited; runtime busy {busy:?} over 300 ms");

    // The connections already in keep being served.
    first.write_all(req).await.unwrap();
    let r = read_one_response(&mut first, Duration::from_secs(3)).await;
    assert_eq!(r.as_deref().map(status_of), Some(200));
    assert_eq!(metric(&server, "cyan_connections_open", &[]), 2.0);

    // One closes: the waiting connection is accepted and answered.
    drop(second);
    let start = Instant::now();
    let r = read_one_response(&mut third, Duration::from_secs(3)).await;
    assert_eq!(
        r.as_deref().map(status_of),
        Some(200),
        "answered once a slot freed"
    );
    eprintln!(
        "max_connections: third answered {:?} after a slot freed",
        start.elapsed()
    );
    assert_eq!(b.hits(), 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_h1_h2_and_wrong_name() {
    let dir = TempDir::new("up");
    let cert = TestCert::generate(dir.path(), "backend", &["backend.test"]);
    let b = Backend::start_tls("blue", &cert).await;
    let ca = cert.cert_path.display().to_string();
    let both = |template: String| template.replace("[{green}]", "[{blue}]");

    // HTTP/1.1 over TLS.
    let tls = format!(", tls = {{ ca = \"{ca}\", server_name = \"backend.test\" }}");
    let cfg = config(&both(custom_config(0.0, "", "", &tls, &tls)), &[&b], &[]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, _, body) = get(&h1_client(), proxy, "/echo-headers", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /echo-headers HTTP/1.1\n"), "{body}");
    assert_eq!(
        b.tls_handshakes.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    server.shutdown().await;

    // HTTP/2 over TLS (ALPN h2).
    let h2 = format!("{tls}, protocol = \"h2\"");
    let cfg = config(&both(custom_config(0.0, "", "", &h2, &h2)), &[&b], &[]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, _, body) = get(&h1_client(), proxy, "/echo-headers", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("GET https://{proxy}/echo-headers HTTP/2.0\n")),
        "{body}"
    );
    assert_eq!(
        b.tls_handshakes.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    server.shutdown().await;
    assert_eq!(b.hits(), 2);

    // A server name the certificate does not cover: no HTTP is exchanged.
    let wrong = format!(", tls = {{ ca = \"{ca}\", server_name = \"other.test\" }}");
    let cfg = config(
        &both(custom_config(0.0, "", "", &wrong, &wrong)),
        &[&b],
        &[],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, _, body) = get(&h1_client(), proxy, "/", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(b.hits(), 2, "nothing reached the backend");
    assert_eq!(
        metric(&server, "cyan_upstream_errors_total", &["kind=\"connect\""]),
        2.0,
        "one failed handshake per color"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_counts_upgraded_tunnels() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let listener = "max_connections = 1";
    let cfg = config(&custom_config(0.0, listener, "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{proxy}/ws"), tcp)
        .await
        .expect("websocket through cyan");
    ws.send(Message::text("ping")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
    assert!(matches!(echo, Ok(Some(Ok(m))) if m == Message::text("ping")));

    // The tunnel is an open client connection: it holds the only slot.
    assert_eq!(metric(&server, "cyan_connections_open", &[]), 1.0);
    let mut other = TcpStream::connect(proxy).await.unwrap();
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let waited = read_one_response(&mut other, Duration::from_millis(300)).await;
    assert!(
        waited.is_none(),
        "answered over the cap while a tunnel is open"
    );

    // The tunnel ends: its slot frees and the waiting connection is served.
    drop(ws);
    let r = read_one_response(&mut other, Duration::from_secs(3)).await;
    assert_eq!(r.as_deref().map(status_of), Some(200));
    server.shutdown().await;
}
