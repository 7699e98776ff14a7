//! Criterion benchmarks of the pure per-request path: one table snapshot,
//! the service match, the color decision and the endpoint pick — everything
//! the proxy decides before any I/O — and what continuous table swaps cost
//! the readers.
//!
//! Run: `cargo bench --bench hot_path`. Targets (issue 6): a route decision
//! under 50 ns; a swap every millisecond costs readers under 5 %.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, Criterion};
use http::{HeaderMap, HeaderValue};

use cyan::config::Config;
use cyan::h1client::RawHead;
use cyan::headers::Fields;
use cyan::metrics::Metrics;
use cyan::table::{Command, Table};

fn table(sticky: bool) -> Table {
    let sticky = if sticky {
        "sticky = { header = \"x-user-id\" }"
    } else {
        ""
    };
    let text = format!(
        r#"
[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "api"
hosts = ["api.example.com"]
path_prefix = "/v2"
candidate_percent = 10
blue  = {{ endpoints = ["127.0.0.1:8101", "127.0.0.1:8102"] }}
green = {{ endpoints = ["127.0.0.1:9101"] }}

[[service]]
name = "gateway"
hosts = ["*"]
candidate_percent = 10
{sticky}
blue  = {{ endpoints = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"] }}
green = {{ endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"] }}
"#
    );
    let cfg = Config::parse(&text).expect("bench config");
    Table::new(&cfg, Metrics::new()).expect("table")
}

/// The decision the proxy makes per request, minus I/O. `headers` is a
/// `HeaderMap` (hyper's server: HTTP/2, and HTTP/1.1 requests cyan's own
/// server does not take) or the head's lines (`RawHead`: cyan's own
/// HTTP/1.1 server).
#[inline]
fn decide(t: &Table, headers: &impl Fields, ip: IpAddr) -> usize {
    let snapshot = t.snapshot();
    let svc = snapshot
        .route(0, "shop.example.com:8080", "/checkout/cart")
        .expect("route");
    let (color, _) = svc.split.choose(headers, ip);
    svc.pool(color).pick(None).expect("endpoint")
}

fn route_decision(c: &mut Criterion) {
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let mut g = c.benchmark_group("route_decision");
    let t = table(false);
    let empty = HeaderMap::new();
    g.bench_function("draw", |b| {
        b.iter(|| black_box(decide(&t, black_box(&empty), ip)))
    });
    let t = table(true);
    // What an API client sends, the sticky header last: the lookup's worst
    // case on the lines, and a hashed lookup's any case on the map.
    let h = client_headers();
    g.bench_function("sticky_header", |b| {
        b.iter(|| black_box(decide(&t, black_box(&h), ip)))
    });
    let lines = client_lines();
    g.bench_function("sticky_header_lines", |b| {
        b.iter(|| black_box(decide(&t, black_box(&lines), ip)))
    });
    g.finish();

    // The parts, to see where the time goes.
    let mut g = c.benchmark_group("parts");
    g.bench_function("snapshot", |b| {
        b.iter(|| black_box(t.snapshot().generation))
    });
    g.bench_function("snapshot_load_full", |b| {
        b.iter(|| black_box(t.load().generation))
    });
    let snap = t.load();
    g.bench_function("route", |b| {
        b.iter(|| {
            black_box(
                snap.route(
                    0,
                    black_box("shop.example.com:8080"),
                    black_box("/checkout/cart"),
                )
                .is_some(),
            )
        })
    });
    let svc = snap.route(0, "shop.example.com", "/").unwrap();
    g.bench_function("choose_sticky", |b| {
        b.iter(|| black_box(svc.split.choose(black_box(&h), ip)))
    });
    // The name goes through `black_box` too: a map hashes it on every
    // lookup, and a name the compiler can see would have its hash hoisted
    // out of the loop (the route decision's name comes from the table).
    let user = http::HeaderName::from_static("x-user-id");
    g.bench_function("header_first", |b| {
        b.iter(|| black_box(black_box(&h).first(black_box(&user)).is_some()))
    });
    g.bench_function("header_first_lines", |b| {
        b.iter(|| black_box(black_box(&lines).first(black_box(&user)).is_some()))
    });
    g.bench_function("xxh3_bucket", |b| {
        b.iter(|| black_box(cyan::split::bucket(black_box(42), black_box(b"user-4711"))))
    });
    let pool = svc.pool(cyan::config::Color::Blue);
    g.bench_function("pick_p2c", |b| b.iter(|| black_box(pool.pick(None))));
    g.finish();
}

/// The headers of [`route_decision`]'s requests, as a map (HTTP/2: the
/// pseudo-headers are not in it).
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("user-agent", "okhttp/4.12.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
        ("accept-language", "en-GB"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"),
        ("x-request-id", "6f1c2b7e-1d2a-4c1b-9f00-5b1e2a3c4d5e"),
        ("x-user-id", "user-4711"),
    ] {
        h.insert(n, HeaderValue::from_static(v));
    }
    h
}

/// The same request as cyan's own HTTP/1.1 server holds it: the head's
/// lines.
fn client_lines() -> RawHead {
    let head = b"GET /checkout/cart HTTP/1.1\r\nHost: shop.example.com:8080\r\nuser-agent: okhttp/4.12.0\r\naccept: application/json\r\naccept-encoding: gzip\r\naccept-language: en-GB\r\nauthorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x\r\nx-request-id: 6f1c2b7e-1d2a-4c1b-9f00-5b1e2a3c4d5e\r\nx-user-id: user-4711\r\n\r\n";
    match cyan::h1server::parse(BytesMut::from(&head[..])) {
        Ok(p) => p.head,
        Err(_) => panic!("the bench's head parses"),
    }
}

fn swaps_under_readers(c: &mut Criterion) {
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let h = client_headers();
    let mut g = c.benchmark_group("reader_while_writer_swaps");
    let t = Arc::new(table(true));
    // What the writer below spends per change (build + swap), on its own:
    // it runs on the other CPU, which on a 2-vCPU machine may be an SMT
    // sibling of the reader's.
    let mut n = 0u16;
    g.bench_function("writer_apply_set_split", |b| {
        b.iter(|| {
            n = (n + 1) % 2000;
            black_box(
                t.apply(
                    Command::SetSplit {
                        service: "gateway".into(),
                        candidate_bp: n,
                    }
                    .into(),
                ),
            )
        })
    });
    g.bench_function("no_writer", |b| b.iter(|| black_box(decide(&t, &h, ip))));
    // A writer applies a split change every millisecond on another thread.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let bp = (n % 2000) as u16;
                let _ = t.apply(
                    Command::SetSplit {
                        service: "gateway".into(),
                        candidate_bp: bp,
                    }
                    .into(),
                );
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    g.bench_function("swap_every_1ms", |b| {
        b.iter(|| black_box(decide(&t, &h, ip)))
    });
    stop.store(true, Ordering::Relaxed);
    let swaps = writer.join().unwrap_or(0);
    eprintln!("writer applied {swaps} swaps during the measurement");
    g.finish();
}

criterion_group!(benches, route_decision, swaps_under_readers);

/// With `HOT_PATH_COUNT=N` and `HOT_PATH_MODE` (`draw`, `sticky_map`,
/// `sticky_lines`, `route`, `pick`), runs that decision N times and exits, for
/// an instruction count that a busy machine does not move:
/// `bash benches/route_ir.sh` runs it under callgrind for N and 2N and
/// prints the difference over N. Otherwise criterion.
fn main() {
    let Some(n) = std::env::var("HOT_PATH_COUNT")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    else {
        benches();
        Criterion::default().configure_from_args().final_summary();
        return;
    };
    let mode = std::env::var("HOT_PATH_MODE").unwrap_or_else(|_| "draw".into());
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let t = table(mode != "draw");
    let (empty, map, lines) = (HeaderMap::new(), client_headers(), client_lines());
    let snap = t.load();
    let svc = snap.route(0, "shop.example.com", "/").expect("route");
    let mut acc = 0usize;
    for _ in 0..n {
        acc = acc.wrapping_add(match mode.as_str() {
            "draw" => decide(&t, black_box(&empty), ip),
            "sticky_map" => decide(&t, black_box(&map), ip),
            "sticky_lines" => decide(&t, black_box(&lines), ip),
            "route" => snap
                .route(
                    0,
                    black_box("shop.example.com:8080"),
                    black_box("/checkout/cart"),
                )
                .is_some() as usize,
            "pick" => svc.pool(cyan::config::Color::Blue).pick(None).unwrap_or(0),
            other => {
                panic!("HOT_PATH_MODE {other:?}: draw, sticky_map, sticky_lines, route or pick")
            }
        });
    }
    black_box(acc);
}
