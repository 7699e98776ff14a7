//! End-to-end scenarios of the metrics and health listener (`[metrics]
//! listen`): what a scrape says against what the backends saw, the families'
//! metadata, `promtool check metrics` when promtool is installed, and
//! readiness during a drain.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cyan::app::App;
use cyan::config::Config;
use support::*;

/// A config with the metrics listener, admin socket and state in `dir`.
fn obs_config(dir: &Path, percent: f64, b: &Backend, g: &Backend) -> String {
    app_config(dir, percent, &[b], &[g], "", "", "")
}

async fn start(text: &str) -> (App, SocketAddr, SocketAddr) {
    let cfg = Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let app = App::start(cfg, None, false).await.expect("app starts");
    let proxy = app.server.local_addr("public").unwrap();
    let metrics = app.metrics_addr.expect("the metrics listener is bound");
    (app, proxy, metrics)
}

/// `GET /metrics` over HTTP: the raw text and its samples.
async fn scrape(metrics: SocketAddr) -> (String, Vec<Sample>) {
    let (status, text) = http_get_once(metrics, "/metrics")
        .await
        .expect("the metrics listener answers");
    assert_eq!(status, 200, "{text}");
    let samples = parse_exposition(&text);
    (text, samples)
}

/// Every family named must carry `# HELP` and `# TYPE <kind>` lines.
fn assert_metadata(text: &str, families: &[(&str, &str)]) {
    for (family, kind) in families {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {family} ")) && l.len() > family.len() + 8),
            "HELP for {family}"
        );
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family} {kind}")),
            "TYPE {kind} for {family}"
        );
    }
}

/// The scrape agrees with the backends and the table, the families are well
/// formed, a rollback shows up, and promtool accepts the exposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_agrees_with_the_backends() {
    let dir = TempDir::new("obs-metrics");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy, metrics) = start(&obs_config(dir.path(), 30.0, &b, &g)).await;

    assert_eq!(
        http_get_once(metrics, "/livez").await.unwrap(),
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get_once(metrics, "/readyz").await.unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(http_get_once(metrics, "/nope").await.unwrap().0, 404);

    // Before any traffic: no request counted.
    let (_, before) = scrape(metrics).await;
    assert!(samples(&before, "cyan_requests_total", &[])
        .iter()
        .all(|s| s.value == 0.0));

    let client = h1_client();
    let n = 300;
    for _ in 0..n {
        let (s, _, _) = get(&client, proxy, "/", &[]).await;
        assert_eq!(s, 200);
    }
    let (bh, gh) = (b.hits(), g.hits());
    assert_eq!(bh + gh, n);
    assert!(
        bh > 0 && gh > 0,
        "both colors served: blue {bh}, green {gh}"
    );

    // A request is counted at the end of its response body, which the
    // client may see a moment before the proxy records it: poll briefly.
    let counted = |s: &[Sample], color: &str| {
        sample_value(
            s,
            "cyan_requests_total",
            &[
                ("service", "gateway"),
                ("color", color),
                ("code_class", "2xx"),
            ],
        )
    };
    let mut text = String::new();
    let mut all = Vec::new();
    for _ in 0..100 {
        (text, all) = scrape(metrics).await;
        if counted(&all, "blue") == bh as f64 && counted(&all, "green") == gh as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted(&all, "blue"), bh as f64, "blue's 2xx = blue's hits");
    assert_eq!(
        counted(&all, "green"),
        gh as f64,
        "green's 2xx = green's hits"
    );
    for class in ["1xx", "3xx", "4xx", "5xx"] {
        assert_eq!(
            samples(&all, "cyan_requests_total", &[("code_class", class)])
                .iter()
                .map(|s| s.value)
                .sum::<f64>(),
            0.0,
            "no {class}"
        );
    }
    for (color, hits) in [("blue", bh), ("green", gh)] {
        let labels = [("service", "gateway"), ("color", color)];
        assert_eq!(
            sample_value(&all, "cyan_request_duration_seconds_count", &labels),
            hits as f64,
            "{color}'s latency observations"
        );
        let inf = [("service", "gateway"), ("color", color), ("le", "+Inf")];
        assert_eq!(
            sample_value(&all, "cyan_request_duration_seconds_bucket", &inf),
            hits as f64
        );
        assert!(sample_value(&all, "cyan_request_duration_seconds_sum", &labels) > 0.0);
        assert_eq!(
            sample_value(&all, "cyan_requests_in_flight", &labels),
            0.0,
            "{color}: nothing in flight"
        );
    }
    assert_eq!(
        sample_value(
            &all,
            "cyan_candidate_share_ratio",
            &[("service", "gateway")]
        ),
        0.3
    );
    let stable = |s: &[Sample], color: &str| {
        sample_value(
            s,
            "cyan_stable_color_info",
            &[("service", "gateway"), ("color", color)],
        )
    };
    assert_eq!((stable(&all, "blue"), stable(&all, "green")), (1.0, 0.0));
    for (color, ep) in [("blue", b.addr), ("green", g.addr)] {
        let ep = ep.to_string();
        assert_eq!(
            sample_value(
                &all,
                "cyan_endpoint_up",
                &[("service", "gateway"), ("color", color), ("endpoint", &ep)]
            ),
            1.0,
            "{color} {ep} is up"
        );
    }
    assert_eq!(
        sample_value(&all, "cyan_table_generation", &[]),
        app.server.table.load().generation as f64
    );
    let open = sample_value(&all, "cyan_connections_open", &[("listener", "public")]);
    assert!(open >= 0.0);
    assert_eq!(
        sample_value(&all, "cyan_build_info", &[("version", cyan::VERSION)]),
        1.0
    );
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            !samples(&all, family, &[]).is_empty(),
            "{family} present: {text}"
        );
    }
    assert_metadata(
        &text,
        &[
            ("cyan_requests_total", "counter"),
            ("cyan_request_duration_seconds", "histogram"),
            ("cyan_requests_in_flight", "gauge"),
            ("cyan_candidate_share_ratio", "gauge"),
            ("cyan_stable_color_info", "gauge"),
            ("cyan_endpoint_up", "gauge"),
            ("cyan_table_generation", "gauge"),
            ("cyan_connections_open", "gauge"),
            ("cyan_build_info", "gauge"),
            ("cyan_config_reloads_total", "counter"),
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
        ],
    );
    assert!(
        samples(&all, "cyan_rollbacks_total", &[]).is_empty(),
        "no rollback yet"
    );

    // Green fails under load until the automatic rollback moves its share
    // to 0.
    let load = Load::start(proxy, 4, "/");
    g.force_status.store(503, Ordering::SeqCst);
    let rolled_back = eventually(Duration::from_secs(8), || candidate_bp(&app) == 0).await;
    let (ok, c4, c5, broken) = load.stop().await;
    assert!(
        rolled_back,
        "automatic rollback after {} requests",
        ok + c4 + c5 + broken
    );
    // The counter moves once the change is persisted, a moment after the swap.
    let rollbacks = |s: &[Sample]| {
        samples(s, "cyan_rollbacks_total", &[("service", "gateway")])
            .iter()
            .map(|s| s.value)
            .sum::<f64>()
    };
    for _ in 0..100 {
        (text, all) = scrape(metrics).await;
        if rollbacks(&all) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rollbacks(&all), 1.0, "one rollback: {text}");
    let reason =
        &samples(&all, "cyan_rollbacks_total", &[("service", "gateway")])[0].labels["reason"];
    assert!(
        [
            "candidate_unhealthy",
            "failure_ratio",
            "relative_failures",
            "latency"
        ]
        .contains(&reason.as_str()),
        "a documented trigger: {reason}"
    );
    assert_eq!(
        sample_value(
            &all,
            "cyan_candidate_share_ratio",
            &[("service", "gateway")]
        ),
        0.0
    );
    assert_eq!((stable(&all, "blue"), stable(&all, "green")), (1.0, 0.0));
    assert!(
        samples(
            &all,
            "cyan_requests_total",
            &[("color", "green"), ("code_class", "5xx")]
        )[0]
        .value
            > 0.0,
        "green's 503s are counted"
    );
    assert_eq!(
        sample_value(&all, "cyan_table_generation", &[]),
        app.server.table.load().generation as f64
    );
    assert_metadata(&text, &[("cyan_rollbacks_total", "counter")]);

    // promtool's linter over the whole exposition.
    match std::process::Command::new("promtool")
        .arg("--version")
        .output()
    {
        Err(_) => {
            eprintln!("promtool not installed, skipped `promtool check metrics` (Debian package `prometheus`)");
        }
        Ok(_) => {
            let file = dir.path().join("scrape.prom");
            std::fs::write(&file, &text).unwrap();
            let out = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::fs::File::open(&file).unwrap())
                .output()
                .expect("promtool runs");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "promtool check metrics failed ({}):\n{said}\n--- scrape ---\n{text}",
                out.status
            );
            eprintln!("promtool check metrics: ok {said}");
        }
    }
    app.shutdown().await;
}

/// `/readyz` turns 503 as soon as the drain starts, while in-flight requests
/// finish; the metrics listener closes once the drain is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_when_the_drain_starts() {
    let dir = TempDir::new("obs-drain");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy, metrics) = start(&obs_config(dir.path(), 0.0, &b, &g)).await;
    assert_eq!(http_get_once(metrics, "/readyz").await.unwrap().0, 200);

    let slow = tokio::spawn(async move {
        let (s, _, body) = get(&h1_client(), proxy, "/delay/800", &[]).await;
        (s, body)
    });
    assert!(
        eventually(Duration::from_secs(3), || b
            .in_flight
            .load(Ordering::SeqCst)
            == 1)
        .await,
        "the slow request reached blue"
    );
    let shutdown = tokio::spawn(app.shutdown());

    // While the drain waits for the slow request: 503, not a refused
    // connection.
    let mut seen = Vec::new();
    let mut not_ready = false;
    for _ in 0..100 {
        let r = http_get_once(metrics, "/readyz").await;
        let r = r.unwrap_or_else(|e| panic!("/readyz answers during the drain: {e}"));
        seen.push(r.0);
        if r == (503, "not ready\n".to_string()) {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "readyz during the drain: {seen:?}");
    assert!(!shutdown.is_finished(), "the drain is still waiting");
    assert_eq!(
        http_get_once(metrics, "/livez").await.unwrap().0,
        200,
        "alive while draining"
    );
    let scraped = http_get_once(metrics, "/metrics").await.unwrap();
    assert_eq!(scraped.0, 200, "scrapes work while draining");
    assert_eq!(
        sample_value(
            &parse_exposition(&scraped.1),
            "cyan_requests_in_flight",
            &[("service", "gateway"), ("color", "blue")]
        ),
        1.0,
        "the slow request is in flight"
    );

    let (s, body) = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the slow request ends")
        .unwrap();
    assert_eq!(s, 200, "the in-flight request completes: {body}");
    assert!(body.contains("delayed 800"), "{body}");
    let report = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the drain ends")
        .unwrap();
    assert_eq!(report.abandoned, 0, "{report:?}");

    // The metrics port stops answering once the drain is over.
    let mut last = None;
    let mut gone = false;
    for _ in 0..100 {
        match tokio::net::TcpStream::connect(metrics).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                gone = true;
                break;
            }
            other => last = Some(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the metrics port is closed after the drain: {last:?}");
}
