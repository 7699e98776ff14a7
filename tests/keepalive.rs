//! HTTP/1.1 keep-alive connections are handed back from hyper between
//! requests (src/keepalive.rs). Every byte a client sends must still be
//! served in order, whatever it sends while the connection is released:
//! the next request after a pause, pipelined requests, a request split across
//! the release, bodies. A body cyan did not read must never be parsed as a
//! request.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::*;

/// Longer than the release linger (10 ms): the connection is released
/// before the next bytes come.
const PAUSE: Duration = Duration::from_millis(60);

async fn proxy_with(blue: &Backend) -> (cyan::server::Server, std::net::SocketAddr) {
    let cfg = config(&service_config(0.0, ""), &[blue], &[blue]);
    start_proxy(&cfg).await
}

/// One service for Host `app.example` only (`{blue}`, `{green}`: endpoint
/// lists); other hosts get 404 without their body being read.
///
/// Request buffering is off: these tests are about a body still streaming
/// when the answer comes. With it on (the default), a body under
/// `request_buffer_bytes` reaches the upstream only once it is whole; a
/// larger one, a gRPC one, or any on a listener with it off takes the
/// streaming path tested here.
const APP_EXAMPLE: &str = r#"
[[listener]]
name = "public"
listen = "127.0.0.1:0"
request_buffer_bytes = 0

[[service]]
name = "app"
hosts = ["app.example"]
blue  = { endpoints = [{blue}] }
green = { endpoints = [{green}] }
"#;

fn body_of(resp: &str) -> &str {
    resp.split("\r\n\r\n").nth(1).unwrap_or("")
}

#[tokio::test]
async fn requests_after_pauses_reuse_the_connection() {
    let blue = Backend::start("blue").await;
    let (_server, proxy) = proxy_with(&blue).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    for i in 0..5 {
        s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
        assert_eq!(r.len(), 1, "request {i} answered on the same connection");
        assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
        tokio::time::sleep(PAUSE).await;
    }
    assert_eq!(blue.hits(), 5);
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let blue = Backend::start("blue").await;
    let (_server, proxy) = proxy_with(&blue).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    // Three requests in one write, then two more after a release.
    s.write_all(
        b"GET /status/201 HTTP/1.1\r\nHost: app\r\n\r\n\
          GET /status/202 HTTP/1.1\r\nHost: app\r\n\r\n\
          GET /status/203 HTTP/1.1\r\nHost: app\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_responses(&mut s, 3, Duration::from_secs(5)).await;
    let statuses: Vec<&str> = r.iter().map(|r| &r[9..12]).collect();
    assert_eq!(statuses, ["201", "202", "203"]);
    tokio::time::sleep(PAUSE).await;
    s.write_all(
        b"GET /status/204 HTTP/1.1\r\nHost: app\r\n\r\n\
          GET /status/205 HTTP/1.1\r\nHost: app\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_responses(&mut s, 2, Duration::from_secs(5)).await;
    let statuses: Vec<&str> = r.iter().map(|r| &r[9..12]).collect();
    assert_eq!(statuses, ["204", "205"]);
}

#[tokio::test]
async fn a_request_split_across_a_release_is_served_whole() {
    let blue = Backend::start("blue").await;
    let (_server, proxy) = proxy_with(&blue).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    // The first request and the start of the second in one write: hyper
    // holds the partial head when the first response is done.
    s.write_all(b"GET /status/201 HTTP/1.1\r\nHost: app\r\n\r\nGET /echo-headers HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("HTTP/1.1 201"), "{}", r[0]);
    tokio::time::sleep(PAUSE).await;
    s.write_all(b"st: app\r\nX-Split: yes\r\n\r\n")
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1, "the split request is answered");
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
    assert!(
        body_of(&r[0]).contains("x-split: yes"),
        "the head reached the backend whole: {}",
        r[0]
    );
}

#[tokio::test]
async fn bodies_then_more_requests_on_one_connection() {
    let blue = Backend::start("blue").await;
    let (_server, proxy) = proxy_with(&blue).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let data = b"hello keep-alive";
    let digest = digest_hex(data);
    // Content-Length body, pause, chunked body, pause, bodiless.
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n{DIGEST}: {digest}\r\n\r\n",
        data.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(PAUSE).await;
    s.write_all(data).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
    assert_eq!(body_of(&r[0]), format!("{digest} {}", data.len()));
    tokio::time::sleep(PAUSE).await;

    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n{DIGEST}: {digest}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(format!("{:x}\r\n", 5).as_bytes())
        .await
        .unwrap();
    s.write_all(&data[..5]).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    tokio::time::sleep(PAUSE).await;
    s.write_all(format!("{:x}\r\n", data.len() - 5).as_bytes())
        .await
        .unwrap();
    s.write_all(&data[5..]).await.unwrap();
    s.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
    assert_eq!(body_of(&r[0]), format!("{digest} {}", data.len()));
    tokio::time::sleep(PAUSE).await;

    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
    assert_eq!(blue.hits(), 3);
}

/// A body cyan answered without reading (no route) arrives after the
/// answer: it must not be taken for the next request.
#[tokio::test]
async fn an_unread_body_is_never_parsed_as_a_request() {
    let blue = Backend::start("blue").await;
    let cfg = config(APP_EXAMPLE, &[&blue], &[&blue]);
    let (_server, proxy) = start_proxy(&cfg).await;
    let smuggled: &[u8] = b"GET /status/299 HTTP/1.1\r\nHost: app.example\r\n\r\n";
    // No route: answered 404 without reading the body.
    for chunked in [false, true] {
        body_after_answer(proxy, "nowhere.example", "", smuggled, chunked, "404").await;
    }
    assert_eq!(blue.hits(), 0, "nothing reached the backend");
    // The backend answers before the body has come (its answer does not
    // depend on it). One body byte comes with the head, so the proxy is
    // reading the body when the answer is done.
    for chunked in [false, true] {
        let hits = blue.hits();
        body_after_answer(proxy, "app.example", "x", smuggled, chunked, "200").await;
        assert_eq!(blue.hits(), hits + 1, "only the POST reached the backend");
    }
    // The proxy still serves.
    let ok = raw_exchange(
        proxy,
        b"GET /status/200 HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// Many connections released and resumed at once, each checking its own
/// answers (a mixed-up socket or replayed buffer would show up here).
#[tokio::test]
async fn many_connections_resume_with_their_own_bytes() {
    let blue = Backend::start("blue").await;
    let (_server, proxy) = proxy_with(&blue).await;
    let mut tasks = Vec::new();
    for c in 0..50u32 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            for i in 0..4u32 {
                let code = 200 + (c * 4 + i) % 27;
                let req = format!("GET /status/{code} HTTP/1.1\r\nHost: app\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let r = read_responses(&mut s, 1, Duration::from_secs(10)).await;
                assert_eq!(r.len(), 1, "conn {c} request {i}");
                assert_eq!(&r[0][9..12], code.to_string(), "conn {c} request {i}");
                tokio::time::sleep(Duration::from_millis(15 + u64::from(c % 5) * 10)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(blue.hits(), 200);
}

/// POSTs to `host` with `first` as the start of the body, reads the answer
/// (`status`), then after a release sends the rest of the body: `smuggled`,
/// a whole request. It must never be answered as one.
async fn body_after_answer(
    proxy: std::net::SocketAddr,
    host: &str,
    first: &str,
    smuggled: &[u8],
    chunked: bool,
    status: &str,
) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let (head, rest) = if chunked {
        let mut head = format!(
            "POST /status/200 HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        if !first.is_empty() {
            head.push_str(&format!("{:x}\r\n{first}\r\n", first.len()));
        }
        let mut rest = format!("{:x}\r\n", smuggled.len()).into_bytes();
        rest.extend_from_slice(smuggled);
        rest.extend_from_slice(b"\r\n0\r\n\r\n");
        (head, rest)
    } else {
        let head = format!(
            "POST /status/200 HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{first}",
            first.len() + smuggled.len()
        );
        (head, smuggled.to_vec())
    };
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1, "{host} chunked={chunked}: answered");
    assert!(
        r[0].starts_with(&format!("HTTP/1.1 {status}")),
        "{host} chunked={chunked}: {}",
        r[0]
    );
    tokio::time::sleep(PAUSE).await;
    // The proxy may already have closed; a failed write is fine.
    let _ = s.write_all(&rest).await;
    let more = read_responses(&mut s, 1, Duration::from_millis(500)).await;
    assert!(
        more.iter().all(|r| !r.starts_with("HTTP/1.1 299")),
        "{host} chunked={chunked}: the body was served as a request: {more:?}"
    );
}

/// A backend that answers at once, then reads the request body to its end
/// (`Content-Length` only) and reports it. It serves one request per
/// connection and counts the requests it saw.
async fn answer_then_read_body() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let end = loop {
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                let mut body = got[end..].to_vec();
                while body.len() < len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(body);
            });
        }
    });
    (addr, rx)
}

/// The backend answers before the body has come and then reads it: the
/// proxy is still streaming the client's body upstream when the answer is
/// done, and hyper's last read of the client came before that. The
/// connection must not be released then: the rest of the body (which looks
/// like a request) goes to the backend as body, never served as a request.
#[tokio::test]
async fn a_body_still_streaming_upstream_keeps_the_connection() {
    let (backend, mut bodies) = answer_then_read_body().await;
    let ep = format!("\"{backend}\"");
    let text = APP_EXAMPLE.replace("{blue}", &ep).replace("{green}", &ep);
    let cfg = cyan::config::Config::parse(&text).unwrap();
    let (_server, proxy) = start_proxy(&cfg).await;
    let smuggled: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: app.example\r\n\r\n";
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\n\r\nx",
        1 + smuggled.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1, "answered");
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
    assert_eq!(body_of(&r[0]), "early");
    // Longer than the release linger: a release would happen now.
    tokio::time::sleep(PAUSE).await;
    s.write_all(smuggled).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(5), bodies.recv())
        .await
        .expect("the backend got the whole body")
        .unwrap();
    let mut want = b"x".to_vec();
    want.extend_from_slice(smuggled);
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&want),
        "the rest of the body went upstream as body"
    );
    let more = read_responses(&mut s, 1, Duration::from_millis(500)).await;
    assert!(
        more.is_empty(),
        "the body was served as a request: {more:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), bodies.recv())
            .await
            .is_err(),
        "no second request reached the backend"
    );
    // The connection goes on serving.
    s.write_all(b"POST /next HTTP/1.1\r\nHost: app.example\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let r = read_responses(&mut s, 1, Duration::from_secs(5)).await;
    assert_eq!(r.len(), 1, "the connection still serves");
    assert!(r[0].starts_with("HTTP/1.1 200"), "{}", r[0]);
}
