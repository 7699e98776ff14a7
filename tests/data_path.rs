//! End-to-end scenarios of the request path: split, stickiness, override,
//! live table swaps, retries, error mapping, forwarding headers, drain.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cyan::config::Color;
use cyan::table::{Applied, Command};
use support::faults::with_addrs;
use support::*;

/// Moves service `gateway` to `candidate_bp` on the live table.
fn set_split(server: &cyan::server::Server, candidate_bp: u16) {
    server
        .table
        .apply(
            Command::SetSplit {
                service: "gateway".into(),
                candidate_bp,
            }
            .into(),
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_follows_the_configured_share() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(20.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let n = 3000;
    let mut green = 0;
    for _ in 0..n {
        let (status, _, body) = get(&client, proxy, "/", &[]).await;
        assert_eq!(status, 200);
        if color_of(&body) == "green" {
            green += 1;
        }
    }
    let share = green as f64 / n as f64;
    // 20 % ± 3 points: over 5 standard deviations for n = 3000.
    assert!((share - 0.20).abs() < 0.03, "green share {share}");
    assert_eq!(b.hits() + g.hits(), n);
    assert_eq!(
        metric(&server, "cyan_requests_total", &["color=\"green\"", "2xx"]),
        green as f64
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_hundred_percent_are_exact() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    for _ in 0..300 {
        get(&client, proxy, "/", &[]).await;
    }
    assert_eq!(g.hits(), 0, "a 0 % side gets nothing");
    set_split(&server, 10_000);
    let before = b.hits();
    for _ in 0..300 {
        get(&client, proxy, "/", &[]).await;
    }
    assert_eq!(
        b.hits(),
        before,
        "a 100 % candidate leaves the stable side empty"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_only_move_forward() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &service_config(10.0, "sticky = { header = \"x-user-id\" }"),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    let mut at10 = HashMap::new();
    for u in &users {
        let (_, _, body) = get(&client, proxy, "/", &[("x-user-id", u)]).await;
        at10.insert(u.clone(), color_of(&body).to_string());
        // Asking again gives the same answer.
        let (_, _, again) = get(&client, proxy, "/", &[("x-user-id", u)]).await;
        assert_eq!(color_of(&again), at10[u], "{u} flipped at a fixed share");
    }
    let green10 = at10.values().filter(|c| *c == "green").count();
    assert!(
        (20..=65).contains(&green10),
        "{green10} of 400 on green at 10 %"
    );
    set_split(&server, 2000);
    let mut green20 = 0;
    for u in &users {
        let (_, _, body) = get(&client, proxy, "/", &[("x-user-id", u)]).await;
        let c = color_of(&body);
        if at10[u] == "green" {
            assert_eq!(c, "green", "{u} left green when the share grew");
        }
        green20 += (c == "green") as usize;
    }
    assert!(green20 > green10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_beats_stickiness() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let extra = "sticky = { header = \"x-user-id\" }\noverride_header = \"x-cyan-color\"\noverride_secret = \"s3cret\"\ncolor_header = \"x-served-by\"";
    let cfg = config(&service_config(0.0, extra), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let (_, h, body) = get(
        &client,
        proxy,
        "/",
        &[("x-user-id", "u1"), ("x-cyan-color", "green:s3cret")],
    )
    .await;
    assert_eq!(color_of(&body), "green");
    assert_eq!(h.get("x-served-by").unwrap(), "green");
    // The secret never reaches the backend.
    let (_, _, echoed) = get(
        &client,
        proxy,
        "/echo-headers",
        &[("x-cyan-color", "green:s3cret")],
    )
    .await;
    assert!(!echoed.contains("s3cret"), "{echoed}");
    // Wrong secret or unknown color: the split decides (0 % → blue).
    for v in ["green:nope", "green", "purple:s3cret"] {
        let (_, _, body) = get(
            &client,
            proxy,
            "/",
            &[("x-user-id", "u1"), ("x-cyan-color", v)],
        )
        .await;
        assert_eq!(color_of(&body), "blue", "override {v:?} must not apply");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_with_requests_in_flight_loses_nothing() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    // 40 slow requests start on the all-blue table...
    let mut slow = Vec::new();
    for _ in 0..40 {
        let client = client.clone();
        slow.push(tokio::spawn(async move {
            get(&client, proxy, "/delay/400", &[]).await
        }));
    }
    assert!(
        eventually(Duration::from_secs(5), || b
            .in_flight
            .load(Ordering::SeqCst)
            == 40)
        .await
    );
    // ...then traffic moves entirely to green, and back and forth.
    for bp in [10_000u16, 0, 10_000] {
        set_split(&server, bp);
    }
    for r in slow {
        let (status, _, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(color_of(&body), "blue", "finished where it started");
    }
    let (_, _, body) = get(&client, proxy, "/", &[]).await;
    assert_eq!(
        color_of(&body),
        "green",
        "new requests follow the new table"
    );
    assert_eq!(server.table.load().generation, 4);
    server.shutdown().await;
}

/// A request whose body is still coming when the table changes goes by the
/// new table: its color is chosen once the body has been read ahead. With
/// read-ahead off it was on its way (to blue) as its head arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_ahead_across_a_swap_goes_by_the_new_table() {
    use tokio::io::AsyncWriteExt;
    for (listener, expect) in [("", "green"), ("request_buffer_bytes = 0", "blue")] {
        let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
        let template = service_config(0.0, "").replace(
            "trusted_proxies = [\"10.0.0.0/8\"]",
            &format!("trusted_proxies = [\"10.0.0.0/8\"]\n{listener}"),
        );
        let cfg = config(&template, &[&b], &[&g]);
        let (server, proxy) = start_proxy(&cfg).await;
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        set_split(&server, 10_000);
        s.write_all(b"56789").await.unwrap();
        let r = read_one_response(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{listener:?}: no answer"));
        assert!(r.starts_with("HTTP/1.1 200"), "{listener:?}: {r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
        assert_eq!(color_of(body), expect, "{listener:?}: {r}");
        assert_eq!(b.hits() + g.hits(), 1);
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_swaps_under_load_fail_no_request() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(50.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let table = server.table.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let bp = (n * 37 % 10_001) as u16;
                let _ = table.apply(
                    Command::SetSplit {
                        service: "gateway".into(),
                        candidate_bp: bp,
                    }
                    .into(),
                );
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        })
    };
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = h1_client();
        workers.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..150 {
                let payload = format!("payload-{i}-").repeat(50);
                let req = http::Request::post(format!("http://{proxy}/upload"))
                    .header(DIGEST, digest_hex(payload.as_bytes()))
                    .body(full(payload))
                    .unwrap();
                let resp = client.request(req).await.expect("request");
                assert_eq!(resp.status(), 200);
                ok += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let swaps = writer.await.unwrap();
    assert_eq!(total, 1200);
    assert!(swaps > 100, "only {swaps} swaps happened");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_another_endpoint() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let dead = dead_addr().await;
    // Blue has a dead endpoint beside a live one.
    let template = service_config(0.0, "").replace("[{blue}]", &format!("[\"{dead}\", {{blue}}]"));
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    for _ in 0..100 {
        let (status, _, body) = get(&client, proxy, "/", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(color_of(&body), "blue", "same color first");
    }
    let retries = metric(&server, "cyan_retries_total", &["color=\"blue\""]);
    assert!(retries > 0.0, "some requests hit the dead endpoint first");
    assert_eq!(
        metric(&server, "cyan_upstream_errors_total", &["kind=\"connect\""]),
        retries
    );
    server.shutdown().await;

    // A pool with only a dead endpoint: the retry goes to the other color.
    let template = service_config(0.0, "").replace("[{blue}]", &format!("[\"{dead}\"]"));
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let (status, _, body) = get(&client, proxy, "/", &[]).await;
    assert_eq!((status.as_u16(), color_of(&body)), (200, "green"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_not_retried_after_bytes_went_upstream() {
    let b = Backend::start("blue").await;
    let g = Backend::start("green").await;
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    // The backend resets mid-response: the request was sent, so no retry,
    // and the client sees an aborted body, not a shorter complete one.
    let resp = client
        .request(
            http::Request::get(format!("http://{proxy}/half/100000"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "a truncated body must not look complete");
    assert_eq!(b.hits(), 1);
    assert_eq!(g.hits(), 0);
    assert_eq!(metric(&server, "cyan_retries_total", &[]), 0.0);
    assert!(
        eventually(Duration::from_secs(2), || metric(
            &server,
            "cyan_upstream_errors_total",
            &["kind=\"reset\""]
        ) == 1.0)
        .await
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trouble_maps_to_502_503_504() {
    let dead = dead_addr().await;
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // Both pools dead → 502 after the one retry.
    let template = service_config(0.0, "")
        .replace("[{blue}]", &format!("[\"{dead}\"]"))
        .replace("[{green}]", &format!("[\"{dead}\"]"));
    let cfg = config(&template, &[], &[]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let (status, _, body) = get(&client, proxy, "/", &[]).await;
    assert_eq!(status, 502, "{body}");
    server.shutdown().await;

    // Response head too slow → 504.
    let extra = "upstream = { response_timeout = \"200ms\" }";
    let template = service_config(0.0, extra);
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let started = std::time::Instant::now();
    let (status, _, _) = get(&client, proxy, "/delay/3000", &[]).await;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        metric(&server, "cyan_upstream_errors_total", &["kind=\"timeout\""]),
        1.0
    );

    // Every endpoint of both colors drained → 503 with Retry-After, no hang.
    for addr in [b.addr, g.addr] {
        server
            .table
            .apply(
                Command::SetDrained {
                    service: "gateway".into(),
                    addr,
                    drained: true,
                }
                .into(),
            )
            .unwrap();
    }
    let (status, h, _) = get(&client, proxy, "/", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_host_gets_404() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let template = service_config(0.0, "hosts = [\"api.example.com\"]\npath_prefix = \"/v1\"");
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let (status, _, _) = get(&client, proxy, "/v1/x", &[("host", "api.example.com")]).await;
    assert_eq!(status, 200);
    let (status, _, body) = get(&client, proxy, "/v1/x", &[("host", "other.example.com")]).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = get(&client, proxy, "/v2", &[("host", "api.example.com")]).await;
    assert_eq!(status, 404);
    assert_eq!(b.hits() + g.hits(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_hop_by_hop_stripping() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(
        &service_config(0.0, "color_header = \"x-cyan-color\""),
        &[&b],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let req = "GET /echo-headers HTTP/1.1\r\nHost: shop.example:8080\r\nConnection: keep-alive, x-private\r\nx-private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers, gzip\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Request-Id: req-42\r\nX-Keep: yes\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(proxy, req.as_bytes(), Duration::from_secs(3)).await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = body.to_ascii_lowercase();
    // The client (127.0.0.1) is not a trusted proxy: its XFF is replaced.
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: shop.example:8080\n"),
        "{body}"
    );
    assert!(
        body.contains("host: shop.example:8080\n"),
        "Host is kept: {body}"
    );
    assert!(body.contains("x-request-id: req-42\n"), "{body}");
    assert!(body.contains("te: trailers\n"), "{body}");
    assert!(body.contains("x-keep: yes\n"));
    for gone in [
        "x-private",
        "keep-alive:",
        "proxy-connection",
        "connection:",
        "1.2.3.4",
    ] {
        assert!(!body.contains(gone), "{gone} reached the backend: {body}");
    }
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-cyan-color: blue"), "{head}");
    assert!(head.contains("x-request-id: req-42"), "{head}");
    // Without an incoming id, one is generated and returned.
    let client = h1_client();
    let (_, h, body) = get(&client, proxy, "/echo-headers", &[]).await;
    let id = h.get("x-request-id").unwrap().to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(body.contains(&format!("x-request-id: {id}")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let mut slow = Vec::new();
    for _ in 0..30 {
        let client = h1_client();
        slow.push(tokio::spawn(async move {
            get(&client, proxy, "/delay/500", &[]).await
        }));
    }
    assert!(
        eventually(Duration::from_secs(5), || b
            .in_flight
            .load(Ordering::SeqCst)
            == 30)
        .await
    );
    let report = server.shutdown().await;
    assert_eq!(report.abandoned, 0);
    for r in slow {
        let (status, h, _) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            h.get("connection").map(|v| v.to_str().unwrap()),
            Some("close")
        );
    }
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drain_deadline_resets_the_rest() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let template =
        service_config(0.0, "").replace("drain_timeout = \"5s\"", "drain_timeout = \"300ms\"");
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let mut slow = Vec::new();
    for _ in 0..5 {
        let client = h1_client();
        slow.push(tokio::spawn(async move {
            let req = http::Request::get(format!("http://{proxy}/delay/5000"))
                .body(empty())
                .unwrap();
            client.request(req).await.map(|r| r.status())
        }));
    }
    assert!(
        eventually(Duration::from_secs(5), || b
            .in_flight
            .load(Ordering::SeqCst)
            == 5)
        .await
    );
    let report = server.shutdown().await;
    assert_eq!(report.abandoned, 5);
    assert!(report.elapsed < Duration::from_secs(2));
    for r in slow {
        let r = tokio::time::timeout(Duration::from_secs(3), r)
            .await
            .expect("no hang")
            .unwrap();
        assert!(r.is_err(), "an abandoned request is reset, not answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_as_the_drain_begins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // A drain deadline far beyond the test's bounds: only a connection that
    // was never told of the drain would wait for it.
    let template =
        service_config(0.0, "").replace("drain_timeout = \"5s\"", "drain_timeout = \"30s\"");
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    // Each served one request on cyan's own HTTP/1.1 path and now waits for
    // the next one.
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The whole answer: its head, then Content-Length bytes of body.
        let mut got = Vec::new();
        let whole = |got: &[u8]| {
            let text = String::from_utf8_lossy(got).to_ascii_lowercase();
            let end = text.find("\r\n\r\n")? + 4;
            let len: usize = text[..end]
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))?
                .trim()
                .parse()
                .ok()?;
            (got.len() >= end + len).then_some(())
        };
        while whole(&got).is_none() {
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "answered: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        idle.push(s);
    }
    let report = tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("the drain ends with the idle connections, not at its deadline");
    assert_eq!(report.abandoned, 0);
    assert!(
        report.elapsed < Duration::from_secs(2),
        "{:?}",
        report.elapsed
    );
    for mut s in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("closed, not left open")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without another answer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_spreads_over_the_pool() {
    let blues = [
        Backend::start("blue").await,
        Backend::start("blue").await,
        Backend::start("blue").await,
    ];
    let g = Backend::start("green").await;
    let cfg = config(
        &service_config(0.0, ""),
        &[&blues[0], &blues[1], &blues[2]],
        &[&g],
    );
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    for _ in 0..600 {
        get(&client, proxy, "/", &[]).await;
    }
    for b in &blues {
        assert!(
            b.hits() > 100,
            "uneven spread: {:?}",
            blues.iter().map(|b| b.hits()).collect::<Vec<_>>()
        );
    }
    // A drained endpoint gets nothing new.
    server
        .table
        .apply(
            Command::SetDrained {
                service: "gateway".into(),
                addr: blues[0].addr,
                drained: true,
            }
            .into(),
        )
        .unwrap();
    let before = blues[0].hits();
    for _ in 0..200 {
        get(&client, proxy, "/", &[]).await;
    }
    assert_eq!(blues[0].hits(), before);
    let t = server.table.load();
    assert_eq!(
        t.service("gateway")
            .unwrap()
            .pool(Color::Blue)
            .eligible
            .len(),
        2
    );
    assert!(matches!(
        server.table.apply(
            Command::SetDrained {
                service: "gateway".into(),
                addr: blues[0].addr,
                drained: true
            }
            .into()
        ),
        Ok(Applied::NoChange { .. })
    ));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let path = std::env::temp_dir().join(format!(
        "cyan-access-{}-{}.log",
        std::process::id(),
        fastrand::u32(..)
    ));
    let extra = "sticky = { header = \"x-user-id\" }\noverride_header = \"x-cyan-color\"";
    let template = format!(
        "[access_log]\npath = \"{}\"\n{}",
        path.display(),
        service_config(0.0, extra)
    );
    let cfg = config(&template, &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    let before = std::time::SystemTime::now();
    get(
        &client,
        proxy,
        "/one?q=1",
        &[("x-user-id", "u1"), ("x-request-id", "rid-1")],
    )
    .await;
    get(&client, proxy, "/two", &[("x-cyan-color", "green")]).await;
    let body = "x".repeat(1000);
    let req = http::Request::post(format!("http://{proxy}/upload"))
        .body(full(body))
        .unwrap();
    client.request(req).await.unwrap();
    raw_exchange(proxy, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(2)).await;
    let after = std::time::SystemTime::now();
    // Shutting down joins the writer: every line is on disk when it returns.
    server.shutdown().await;
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(read().lines().count(), 4, "{}", read());
    let lines: Vec<serde_json::Value> = read()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let first = &lines[0];
    assert_eq!(first["request_id"], "rid-1");
    assert_eq!(first["path"], "/one?q=1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert_eq!(first["service"], "gateway");
    assert_eq!(first["color"], "blue");
    assert_eq!(first["color_reason"], "fixed");
    assert_eq!(first["endpoint"], b.addr.to_string());
    assert_eq!(first["generation"], 1);
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert!(first["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first.get("error").is_none());
    // Each line's time is when its request arrived: within the test's run
    // and in request order, to the millisecond the text keeps.
    let times: Vec<std::time::SystemTime> = lines
        .iter()
        .map(|l| humantime::parse_rfc3339(l["time"].as_str().unwrap()).expect("RFC 3339 time"))
        .collect();
    let ms = Duration::from_millis(1);
    assert!(times[0] + ms >= before && times[3] <= after, "{times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(
        (
            lines[1]["color"].as_str(),
            lines[1]["color_reason"].as_str()
        ),
        (Some("green"), Some("override"))
    );
    assert_eq!(lines[2]["bytes_in"], 1000);
    assert_eq!(
        (lines[3]["status"].as_u64(), lines[3]["error"].as_str()),
        (Some(400), Some("rejected"))
    );
    let _ = std::fs::remove_file(&path);
}

/// A backend speaking raw bytes: `/good` is a proper keep-alive answer, the
/// other paths send malicious framing. Counts accepted connections.
async fn raw_backend() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/");
                    let answer: &[u8] = match path {
                        "/good" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        "/hop" => b"HTTP/1.1 200 OK\r\nServer: raw\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Served-By: upstream\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Request-Id: echoed\r\nContent-Length: 2\r\n\r\nok",
                        "/cl-te" => b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
                        "/two-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nContent-Length: 9\r\n\r\nSMUGGLED!",
                        "/split" => b"HTTP/1.1 200 OK\r\nX-A: b\rSet-Cookie: SMUGGLED=1\r\nContent-Length: 2\r\n\r\nok",
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Sends `request` on a new connection and reads the answer to its end
/// (Content-Length framed): its status and its header lines, names
/// lowercased.
async fn whole_answer(
    proxy: std::net::SocketAddr,
    request: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let mut lines = text[..end].split("\r\n");
            let status = lines.next().unwrap()[9..12].parse().unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (n, v) = l.split_once(':').unwrap();
                    (n.to_ascii_lowercase(), v.trim().to_string())
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            if got.len() >= end + 4 + len {
                let body = text[end + 4..end + 4 + len].to_string();
                return (status, headers, body);
            }
        }
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_lose_the_same_hop_by_hop_lines_on_both_server_paths() {
    // The same answer from cyan's own client, given to a client on cyan's
    // own HTTP/1.1 path (written from the head's lines) and on hyper's
    // (`Connection: close` sends it there; a header map made of the lines).
    let (raw, _) = raw_backend().await;
    let g = Backend::start("green").await;
    let template = service_config(0.0, "color_header = \"x-served-by\"")
        .replace("[{blue}]", &format!("[\"{raw}\"]"));
    let cfg = config(&template, &[], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let mut seen = Vec::new();
    for extra in ["", "Connection: close\r\n"] {
        let req = format!("GET /hop HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        let (status, mut headers, body) = whole_answer(proxy, &req).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "{extra}");
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        for gone in ["x-private", "keep-alive"] {
            assert!(
                !names.contains(&gone),
                "{gone} forwarded ({extra}): {headers:?}"
            );
        }
        let all = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(
            all("x-served-by"),
            ["blue"],
            "cyan's color replaces the upstream's"
        );
        assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(
            all("x-request-id"),
            ["echoed"],
            "the upstream's echo is kept"
        );
        assert_eq!(all("server"), ["raw"]);
        assert_eq!(all("date").len(), 1);
        // What differs by design: the close asked for, and the date.
        headers.retain(|(n, _)| n != "connection" && n != "date");
        headers.sort();
        seen.push(headers);
    }
    assert_eq!(seen[0], seen[1], "both paths forward the same lines");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_backend_responses_become_502_and_are_not_pooled() {
    let (raw, conns) = raw_backend().await;
    let g = Backend::start("green").await;
    let template = service_config(0.0, "").replace("[{blue}]", &format!("[\"{raw}\"]"));
    let cfg = config(&template, &[], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    for _ in 0..2 {
        let (s, _, body) = get(&client, proxy, "/good", &[]).await;
        assert_eq!((s.as_u16(), body.as_str()), (200, "ok"));
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "good answers reuse the pooled connection"
    );
    let mut expected_conns = 1;
    for path in ["/cl-te", "/two-cl", "/split"] {
        let (s, h, body) = get(&client, proxy, path, &[]).await;
        assert_eq!(s, 502, "{path}: {body}");
        assert!(
            !body.contains("SMUGGLED"),
            "{path}: smuggled bytes reached the client: {body}"
        );
        assert!(h.get("set-cookie").is_none(), "{path}");
        // The poisoned connection is gone: the next request opens a new one.
        let (s, _, _) = get(&client, proxy, "/good", &[]).await;
        assert_eq!(s, 200);
        expected_conns += 1;
        assert_eq!(
            conns.load(Ordering::SeqCst),
            expected_conns,
            "{path}: the connection was reused"
        );
    }
    assert_eq!(g.hits(), 0, "a bad response is not retried elsewhere");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_are_not_upstream_failures() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    for _ in 0..10 {
        let client = h1_client();
        let req = http::Request::get(format!("http://{proxy}/delay/1000"))
            .body(empty())
            .unwrap();
        // The client gives up long before the backend answers.
        let _ = tokio::time::timeout(Duration::from_millis(100), client.request(req)).await;
    }
    assert!(
        eventually(Duration::from_secs(3), || metric(
            &server,
            "cyan_requests_total",
            &["code_class=\"4xx\""]
        ) == 10.0)
        .await,
        "aborted requests are counted as 499 (client closed request)"
    );
    assert_eq!(
        metric(&server, "cyan_requests_total", &["code_class=\"5xx\""]),
        0.0
    );
    let t = server.table.load();
    let pool = t.service("gateway").unwrap().pool(Color::Blue);
    assert_eq!(
        pool.endpoints[0].upstream.consecutive_failures(),
        0,
        "no passive-health failure"
    );
    let window = pool.metrics.window.summary(std::time::Instant::now(), None);
    assert_eq!(window.failures, 0, "no failure for the rollback analysis");
    server.shutdown().await;
}

/// A bare HTTP/1.1 backend: on each connection, answers every request head
/// with `answer` and closes the connection `close_after` the answer (an
/// endpoint that times idle keep-alive connections out). Returns its
/// address and a count of the connections it accepted.
async fn closing_backend(
    answer: &'static [u8],
    close_after: Duration,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                tokio::time::sleep(close_after).await;
            });
        }
    });
    (addr, accepted)
}

/// Upstream keep-alive connections the endpoint closed while they sat in
/// the pool are never used: every request of a series spaced past the
/// endpoint's idle close succeeds, each on a new connection. Both with
/// cyan's own HTTP/1.1 client (GET) and with hyper's (`fast_http1 = false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_endpoint_closed_are_never_used() {
    for fast in [true, false] {
        let (addr, accepted) = closing_backend(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Duration::from_millis(20),
        )
        .await;
        let text = format!(
            "{}\n[service.upstream]\nfast_http1 = {fast}\n",
            service_config(0.0, "")
        );
        let cfg = with_addrs(&text, &[addr], &[addr]);
        let (server, proxy) = start_proxy(&cfg).await;
        let client = h1_client();
        for i in 0..12 {
            let (status, _, body) = get(&client, proxy, "/", &[]).await;
            assert_eq!(
                (status.as_u16(), body.as_str()),
                (200, "hello"),
                "request {i} (fast_http1 = {fast})"
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 12, "fast_http1 = {fast}");
        server.shutdown().await;
    }
}

/// Chunked answers (with extensions and trailers), HEAD answers and
/// answers framed by the connection's close reach the client whole through
/// cyan's own HTTP/1.1 client; a malformed chunked body is cut off, never
/// passed on as if it were complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_relays_chunked_head_and_close_framed_answers() {
    let cases: [(&'static [u8], &str, u16, &str); 3] = [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\n",
            "GET",
            200,
            "hello!",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            "HEAD",
            200,
            "",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the close", "GET", 200, "until the close"),
    ];
    for (answer, method, want_status, want_body) in cases {
        let (addr, _) = closing_backend(answer, Duration::ZERO).await;
        let cfg = with_addrs(&service_config(0.0, ""), &[addr], &[addr]);
        let (server, proxy) = start_proxy(&cfg).await;
        let client = h1_client();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{proxy}/"))
            .body(empty())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), want_status);
        if method == "HEAD" {
            assert_eq!(resp.headers()["content-length"], "5");
        }
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|c| c.to_bytes());
        assert_eq!(
            body.as_deref().ok(),
            Some(want_body.as_bytes()),
            "{method} {:?}",
            String::from_utf8_lossy(answer)
        );
        server.shutdown().await;
    }
    // Broken chunk framing: the client's body fails, it is not cut short
    // into something that looks whole.
    let (addr, _) = closing_backend(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        Duration::from_millis(200),
    )
    .await;
    let cfg = with_addrs(&service_config(0.0, ""), &[addr], &[addr]);
    let (server, proxy) = start_proxy(&cfg).await;
    let resp = h1_client()
        .request(
            http::Request::get(format!("http://{proxy}/"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(
        body.is_err(),
        "a malformed chunked body is not passed on whole"
    );
    server.shutdown().await;
}

/// Reads `n` answers (each framed by Content-Length) from a raw connection:
/// status, the `x-request-id` header and the body of each.
async fn read_answers(s: &mut tokio::net::TcpStream, n: usize) -> Vec<(u16, bool, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut tmp = [0u8; 4096];
    while out.len() < n {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = r.parse(&buf) {
            let cl: usize = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .expect("content-length");
            let has_id = r
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("x-request-id"));
            if buf.len() >= len + cl {
                let body = String::from_utf8_lossy(&buf[len..len + cl]).to_string();
                out.push((r.code.unwrap(), has_id, body));
                buf.drain(..len + cl);
                continue;
            }
        }
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .expect("answers within 5 s")
            .unwrap();
        assert!(got > 0, "connection closed after {} answers", out.len());
        buf.extend_from_slice(&tmp[..got]);
    }
    out
}

/// cyan's own HTTP/1.1 path and hyper's share one connection: two GETs
/// pipelined in one write are answered in order, a POST after them goes
/// through hyper, and the GET after that comes back to cyan's path. The
/// same exchange with `[[listener]] fast_http1 = false` gets the same
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_mixed_requests_share_a_connection() {
    use tokio::io::AsyncWriteExt;
    for fast in [true, false] {
        let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
        let text = service_config(0.0, "").replace(
            "trusted_proxies = [\"10.0.0.0/8\"]",
            &format!("trusted_proxies = [\"10.0.0.0/8\"]\nfast_http1 = {fast}"),
        );
        let cfg = config(&text, &[&b], &[&g]);
        assert_eq!(cfg.listeners[0].fast_http1, fast);
        let (server, proxy) = start_proxy(&cfg).await;
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"GET /status/201 HTTP/1.1\r\nhost: x\r\n\r\nGET /status/202 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let first = read_answers(&mut s, 2).await;
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let post = read_answers(&mut s, 1).await;
        s.write_all(b"HEAD /status/200 HTTP/1.1\r\nhost: x\r\n\r\nGET /status/203 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The HEAD answer has no body whatever its Content-Length says: read
        // its head alone, then the GET's answer.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            use tokio::io::AsyncReadExt;
            assert_eq!(s.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-length: 12"),
            "HEAD keeps its length: {head}"
        );
        let last = read_answers(&mut s, 1).await;
        assert_eq!(
            (first[0].0, first[1].0, last[0].0),
            (201, 202, 203),
            "fast_http1 = {fast}"
        );
        assert!(
            first.iter().chain(&last).all(|a| a.1),
            "every answer carries X-Request-Id"
        );
        assert_eq!(post[0].0, 200, "{:?}", post[0]);
        assert!(
            post[0].2.ends_with(" 5"),
            "the POST body went up whole: {:?}",
            post[0]
        );
        server.shutdown().await;
    }
}
