//! End-to-end scenarios of the protocols cyan speaks: h2c, TLS termination
//! (ALPN, versions, SNI), gRPC-style trailers, WebSocket upgrades, large
//! streamed bodies with flat memory, and the PROXY protocol.
//!
//! The 1 GiB upload/download is `#[ignore]`d (too slow in a debug build):
//! `cargo test --release --test protocols -- --ignored`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Version};
use http_body::Frame;
use http_body_util::BodyExt;
use rustls::version::{TLS12, TLS13};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1024 * 1024;

/// The first line `/echo-headers` prints: `GET <uri> HTTP/x`.
fn first_line(body: &str) -> &str {
    body.lines().next().unwrap_or("")
}

fn get_req(uri: String) -> Request<BoxBody> {
    Request::get(uri).body(empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_through_h1_and_h2c_upstreams() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // HTTP/1.1 upstream (the default): the client speaks h2c to cyan.
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h2c_client();
    let resp = client
        .request(get_req(format!("http://{proxy}/echo-headers")))
        .await
        .expect("h2c request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2, "cyan answered over h2");
    let body = body_text(resp).await;
    assert_eq!(
        first_line(&body),
        "GET /echo-headers HTTP/1.1",
        "an http1 pool gets origin-form HTTP/1.1: {body}"
    );
    assert!(
        body.contains(&format!("host: {proxy}\n")),
        ":authority became Host: {body}"
    );
    server.shutdown().await;

    // protocol = "h2c" on both pools: the backend sees HTTP/2.
    let h2c = ", protocol = \"h2c\"";
    let cfg = config(&custom_config(0.0, "", "", h2c, h2c), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    for client in [h2c_client(), h1_client()] {
        let resp = client
            .request(get_req(format!("http://{proxy}/echo-headers")))
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        let body = body_text(resp).await;
        assert_eq!(
            first_line(&body),
            format!("GET http://{proxy}/echo-headers HTTP/2.0"),
            "{body}"
        );
        assert!(!body.contains("\nhost:"), "no Host header on h2: {body}");
    }
    assert_eq!(b.hits(), 3);
    assert_eq!(g.hits(), 0);
    server.shutdown().await;
}

/// A TLS listener with a default certificate (`default.test`) and an SNI
/// certificate (`api.test`).
struct TlsSetup {
    _dir: TempDir,
    default: TestCert,
    api: TestCert,
}

fn tls_setup() -> TlsSetup {
    let dir = TempDir::new("tls");
    let default = TestCert::generate(dir.path(), "default", &["default.test"]);
    let api = TestCert::generate(dir.path(), "api", &["api.test"]);
    TlsSetup {
        _dir: dir,
        default,
        api,
    }
}

fn tls_listener(s: &TlsSetup) -> String {
    format!(
        "tls = {{ {}, sni_certs = [{{ {} }}] }}",
        s.default.toml_pair(),
        s.api.toml_pair()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_alpn_and_versions() {
    let tls = tls_setup();
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &custom_config(0.0, &tls_listener(&tls), "", "", ""),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;

    // ALPN h2 → HTTP/2, TLS 1.3 by default.
    let c = tls_connector(
        &[&tls.default.der],
        &[b"h2", b"http/1.1"],
        &[&TLS13, &TLS12],
    );
    let s = tls_connect(&c, proxy, "default.test").await.expect("tls");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let resp = h2_send(s, get_req("https://default.test/echo-headers".into()))
        .await
        .expect("h2 over tls");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = body_text(resp).await;
    assert!(
        body.contains("x-forwarded-proto: https\n"),
        "TLS is reported upstream: {body}"
    );

    // ALPN http/1.1 → HTTP/1.1.
    let c = tls_connector(&[&tls.default.der], &[b"http/1.1"], &[&TLS13, &TLS12]);
    let s = tls_connect(&c, proxy, "default.test").await.expect("tls");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = Request::get("/")
        .header("host", "default.test")
        .body(empty())
        .unwrap();
    let resp = h1_send(s, req).await.expect("h1 over tls");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(color_of(&body_text(resp).await), "blue");

    // A client limited to TLS 1.2 still gets in.
    let c = tls_connector(&[&tls.default.der], &[b"http/1.1"], &[&TLS12]);
    let s = tls_connect(&c, proxy, "default.test")
        .await
        .expect("tls 1.2");
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let req = Request::get("/")
        .header("host", "default.test")
        .body(empty())
        .unwrap();
    assert_eq!(h1_send(s, req).await.expect("h1").status(), 200);
    assert_eq!(b.hits(), 3);
    assert_eq!(metric(&server, "cyan_tls_handshake_errors_total", &[]), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_picks_the_certificate_and_failures_are_counted() {
    let tls = tls_setup();
    assert_ne!(tls.default.der, tls.api.der);
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &custom_config(0.0, &tls_listener(&tls), "", "", ""),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let any = tls_connector_any();
    for (sni, expected, which) in [
        ("api.test", &tls.api.der, "the SNI certificate"),
        ("default.test", &tls.default.der, "the default certificate"),
        ("unknown.test", &tls.default.der, "the default certificate"),
    ] {
        let s = tls_connect(&any, proxy, sni).await.expect("tls");
        let served = &s.get_ref().1.peer_certificates().expect("a certificate")[0];
        assert!(served == expected, "SNI {sni} must get {which}");
    }
    // With real verification: each name validates against its own cert.
    let c = tls_connector(&[&tls.api.der], &[b"http/1.1"], &[&TLS13]);
    let s = tls_connect(&c, proxy, "api.test")
        .await
        .expect("api.test verifies");
    let req = Request::get("/")
        .header("host", "api.test")
        .body(empty())
        .unwrap();
    assert_eq!(h1_send(s, req).await.expect("h1").status(), 200);

    // A client that does not trust the certificate fails, and it is counted.
    let errors = || metric(&server, "cyan_tls_handshake_errors_total", &["public"]);
    assert_eq!(errors(), 0.0);
    let untrusting = tls_connector(&[&tls.api.der], &[b"http/1.1"], &[&TLS13, &TLS12]);
    for _ in 0..2 {
        let r = tls_connect(&untrusting, proxy, "default.test").await;
        assert!(
            r.is_err(),
            "an untrusted certificate must fail the handshake"
        );
    }
    assert!(
        eventually(Duration::from_secs(3), || errors() == 2.0).await,
        "handshake errors counted: {}",
        errors()
    );
    server.shutdown().await;
}

/// A request body of `data` followed by a trailers frame.
fn body_with_trailers(data: &'static [u8], trailers: HeaderMap) -> BoxBody {
    let frames = vec![
        Frame::data(Bytes::from_static(data)),
        Frame::trailers(trailers),
    ];
    BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(Ok::<_, BoxError>),
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_cross_h2_both_ways() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let h2c = ", protocol = \"h2c\"";
    let cfg = config(&custom_config(0.0, "", "", h2c, h2c), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    for value in ["abc", "second-call"] {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-request-trailer", HeaderValue::from_static(value));
        let req = Request::post(format!("http://{proxy}/trailers"))
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(body_with_trailers(b"\0\0\0\0\x05hello", trailers))
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let resp = h2_send(tcp, req).await.expect("h2c request");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "application/grpc"
        );
        let collected = resp.into_body().collect().await.expect("body");
        let t = collected
            .trailers()
            .cloned()
            .expect("response trailers arrive");
        assert_eq!(collected.to_bytes(), "ok");
        assert_eq!(t.get("grpc-status").unwrap(), "0");
        assert_eq!(
            t.get("x-request-trailer").unwrap(),
            value,
            "the request trailer reached the backend"
        );
    }
    assert_eq!(b.hits(), 2);
    server.shutdown().await;
}

async fn next_msg(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo arrives")
        .expect("stream open")
        .expect("frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{proxy}/ws"), tcp)
        .await
        .expect("websocket handshake through cyan");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through cyan")).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, Message::text("hello through cyan"));
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, Message::binary(blob));
    for i in 0..20 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(next_msg(&mut ws).await, Message::text(format!("m{i}")));
    }
    // Clean close: our Close is answered with a Close, then the stream ends.
    ws.close(None).await.expect("close sent");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        let mut saw_close = false;
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(_)) => saw_close = true,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => panic!("unclean close: {e}"),
            }
        }
        saw_close
    })
    .await
    .expect("closing handshake completes");
    assert!(end, "the backend's Close came back through the tunnel");
    assert_eq!(b.hits(), 1, "one upgrade request");
    server.shutdown().await;
}

/// Uploads `n` generated bytes to `/upload`; returns the elapsed time and the
/// peak RSS growth during the transfer.
async fn upload(proxy: SocketAddr, n: u64) -> (Duration, u64) {
    let expected = Generated::digest(n);
    let client = h1_client();
    let before = rss_bytes();
    let peak = RssPeak::start();
    let started = Instant::now();
    let req = Request::post(format!("http://{proxy}/upload"))
        .header(DIGEST, &expected)
        .body(BodyExt::boxed(Generated::new(n)))
        .unwrap();
    let resp = client.request(req).await.expect("upload");
    let status = resp.status();
    let body = body_text(resp).await;
    let elapsed = started.elapsed();
    let growth = peak.finish().saturating_sub(before);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("{expected} {n}"), "backend digest and length");
    (elapsed, growth)
}

/// Downloads `/big/<n>` and counts the bytes; returns elapsed and RSS growth.
async fn download(proxy: SocketAddr, n: u64) -> (Duration, u64) {
    let client = h1_client();
    let before = rss_bytes();
    let peak = RssPeak::start();
    let started = Instant::now();
    let resp = client
        .request(get_req(format!("http://{proxy}/big/{n}")))
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut offset_ok = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(d) = frame.data_ref() {
            // Spot-check content, not just length: first byte of each chunk.
            if let Some(&first) = d.first() {
                offset_ok &= first == Generated::byte(got);
            }
            got += d.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    let growth = peak.finish().saturating_sub(before);
    assert_eq!(got, n, "every byte streamed through");
    assert!(offset_ok, "bytes arrived in order");
    (elapsed, growth)
}

async fn big_bodies(upload_n: u64, download_n: u64, max_growth: u64) {
    let _heavy = HEAVY.lock().await;
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&custom_config(0.0, "", "", "", ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (t_up, rss_up) = upload(proxy, upload_n).await;
    eprintln!(
        "upload {} MiB: {:.2?}, peak RSS growth {:.1} MiB",
        upload_n / MIB,
        t_up,
        rss_up as f64 / MIB as f64
    );
    assert!(
        rss_up < max_growth,
        "RSS grew {rss_up} bytes for a {upload_n}-byte upload"
    );
    let (t_down, rss_down) = download(proxy, download_n).await;
    eprintln!(
        "download {} MiB: {:.2?}, peak RSS growth {:.1} MiB",
        download_n / MIB,
        t_down,
        rss_down as f64 / MIB as f64
    );
    assert!(
        rss_down < max_growth,
        "RSS grew {rss_down} bytes for a {download_n}-byte download"
    );
    assert_eq!(
        metric(&server, "cyan_requests_total", &["2xx"]),
        2.0,
        "both requests accounted for as complete"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_bodies_keep_memory_flat() {
    big_bodies(256 * MIB, 128 * MIB, 64 * MIB).await;
}

/// The full-size version: `cargo test --release --test protocols -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "1 GiB each way; run in release: cargo test --release --test protocols -- --ignored"]
async fn one_gib_upload_and_download_keep_memory_flat() {
    big_bodies(1024 * MIB, 1024 * MIB, 64 * MIB).await;
}

fn proxy_listener() -> &'static str {
    "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]"
}

/// Sends `header` then `request` on one connection; returns the response.
async fn via_proxy_header(proxy: SocketAddr, header: &[u8], request: &str) -> RawOutcome {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(request.as_bytes());
    s.write_all(&bytes).await.unwrap();
    exchange_on(&mut s, b"", Duration::from_secs(3)).await
}

fn v2_header(src: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = "127.0.0.1:80".parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

const ECHO: &str = "GET /echo-headers HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_v2_and_missing_header() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &custom_config(0.0, proxy_listener(), "", "", ""),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;

    let out = via_proxy_header(proxy, b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 80\r\n", ECHO).await;
    assert!(out.text.starts_with("HTTP/1.1 200"), "{}", out.text);
    assert!(
        out.text.contains("x-forwarded-for: 203.0.113.7\n"),
        "v1 source is the client: {}",
        out.text
    );

    let out = via_proxy_header(proxy, &v2_header("198.51.100.9:4444"), ECHO).await;
    assert!(out.text.starts_with("HTTP/1.1 200"), "{}", out.text);
    assert!(
        out.text.contains("x-forwarded-for: 198.51.100.9\n"),
        "v2 source is the client: {}",
        out.text
    );
    assert_eq!(b.hits(), 2);

    // A trusted peer must send the header: a bare request is dropped unanswered.
    let out = via_proxy_header(proxy, b"", ECHO).await;
    assert!(out.closed, "connection closed");
    assert_eq!(out.text, "", "no response without a PROXY header");
    assert!(out.elapsed < Duration::from_secs(2));
    // So is a malformed one.
    let out = via_proxy_header(proxy, b"PROXY TCP4 nonsense\r\n", ECHO).await;
    assert!(out.closed && out.text.is_empty(), "{}", out.text);
    assert_eq!(b.hits(), 2, "nothing reached the backend");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_client_ip_uses_the_proxy_source() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &custom_config(
            50.0,
            proxy_listener(),
            "sticky = { client_ip = true }",
            "",
            "",
        ),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    // Find one source address per color (the candidate, green, owns buckets
    // below 5000; the salt defaults to the service name).
    let seed = cyan::split::seed_for_salt("gateway");
    let pick = |want_green: bool| {
        (1..=254u8)
            .map(|i| std::net::Ipv4Addr::new(203, 0, 113, i))
            .find(|ip| (cyan::split::bucket(seed, &ip.octets()) < 5000) == want_green)
            .expect("an address of each color")
    };
    let (green_ip, blue_ip) = (pick(true), pick(false));
    let plain = "GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";
    for (ip, color) in [(green_ip, "green"), (blue_ip, "blue")] {
        for port in [1000u16, 2000, 3000, 4000, 5000] {
            // Mixed v1 and v2: both must key on the same source address.
            let header = if port % 2000 == 0 {
                v2_header(&format!("{ip}:{port}"))
            } else {
                format!("PROXY TCP4 {ip} 127.0.0.1 {port} 80\r\n").into_bytes()
            };
            let out = via_proxy_header(proxy, &header, plain).await;
            let body = out.text.split("\r\n\r\n").nth(1).unwrap_or("");
            assert_eq!(color_of(body), color, "source {ip} (port {port})");
        }
    }
    assert_eq!((b.hits(), g.hits()), (5, 5));
    server.shutdown().await;
}
