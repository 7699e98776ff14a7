//! End-to-end scenarios of health checks, automatic rollback and
//! progressive rollouts, with fake backends switched to fail, slow down or
//! die under load.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use cyan::app::App;
use cyan::config::Color;
use cyan::ctl::{call, Target};
use support::*;

/// A config with admin + state in `dir`; `inline` keys go into the service
/// before its pools, `tables` after them.
fn cfg(
    dir: &Path,
    percent: f64,
    blue: &[&Backend],
    green: &[&Backend],
    inline: &str,
    tables: &str,
) -> String {
    app_config(dir, percent, blue, green, "", inline, tables)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_green_is_rolled_back_within_three_seconds() {
    let dir = TempDir::new("fail");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start_app(&cfg(&dir, 20.0, &[&b], &[&g], "", "")).await;
    let load = Load::start(proxy, 4, "/");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(candidate_bp(&app), 2000, "a healthy green is left alone");

    g.force_status.store(503, Ordering::SeqCst);
    let broke = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || candidate_bp(&app) == 0).await,
        "rolled back"
    );
    let took = broke.elapsed();
    eprintln!("green failing -> 0% green in {took:?}");
    assert!(took < Duration::from_secs(3), "rollback took {took:?}");

    let t = app.server.table.load();
    let latch = t
        .service("gateway")
        .unwrap()
        .rolled_back
        .clone()
        .expect("latched");
    // Passive ejection usually sees it first (candidate_unhealthy); the ratio
    // triggers are the backstop. Either way the numbers are in the reason.
    assert!(
        ["candidate_unhealthy", "failure_ratio", "relative_failures"]
            .iter()
            .any(|k| latch.reason.starts_with(k)),
        "{}",
        latch.reason
    );
    assert!(
        latch.reason.contains('%'),
        "the numbers that tripped it: {}",
        latch.reason
    );
    // The counter moves once the change is persisted (a few ms after the swap).
    assert!(
        eventually(Duration::from_secs(1), || metric(
            &app.server,
            "cyan_rollbacks_total",
            &["service=\"gateway\""]
        ) == 1.0)
        .await
    );

    // Green recovers: no flapping back, the latch holds until an operator acts.
    g.force_status.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(candidate_bp(&app), 0);
    let (_, _, c5, broken) = load.stop().await;
    assert_eq!(broken, 0, "no hang, no truncated response");
    assert!(c5 > 0);

    let sock = Target::Socket(dir.join("admin.sock"));
    let (_, v) = call(&sock, Method::GET, "/v1/events", None).await.unwrap();
    let ev = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "auto_rollback")
        .cloned()
        .expect("audited");
    assert_eq!(ev["origin"], "rollback");
    assert_eq!(ev["before"]["candidate_percent"], 20.0);
    assert_eq!(ev["after"]["candidate_percent"], 0.0);
    let (_, v) = call(&sock, Method::GET, "/v1/services/gateway", None)
        .await
        .unwrap();
    assert!(v["rolled_back"]["reason"].is_string());
    // An operator's split clears the latch.
    call(
        &sock,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 5})),
    )
    .await
    .unwrap();
    assert!(app
        .server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .rolled_back
        .is_none());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_that_fails_some_requests_is_rolled_back() {
    let dir = TempDir::new("partial");
    let (b, g1, g2) = (
        Backend::start("blue").await,
        Backend::start("green").await,
        Backend::start("green").await,
    );
    // Passive ejection off so that the ratio trigger is what acts.
    let (app, proxy) = start_app(&cfg(
        &dir,
        30.0,
        &[&b],
        &[&g1, &g2],
        "",
        "[service.health]\neject_after = 0",
    ))
    .await;
    let load = Load::start(proxy, 4, "/");
    tokio::time::sleep(Duration::from_millis(500)).await;
    g1.force_status.store(500, Ordering::SeqCst); // about half of green's requests fail
    assert!(eventually(Duration::from_secs(6), || candidate_bp(&app) == 0).await);
    load.stop().await;
    app.shutdown().await;
}

/// A backend that answers every request after `delay`: a TCP relay in
/// front of a normal backend that holds each request's bytes back.
async fn slow_backend(delay: Duration) -> std::net::SocketAddr {
    let inner = Backend::start("green").await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let target = inner.addr;
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut u) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = c.split();
                let (mut ur, mut uw) = u.split();
                let up = async {
                    let mut buf = [0u8; 8192];
                    loop {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        tokio::time::sleep(delay).await;
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut ur, &mut cw);
                let _ = tokio::join!(up, down);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_green_is_rolled_back() {
    let dir = TempDir::new("slow");
    let (b, placeholder) = (Backend::start("blue").await, Backend::start("green").await);
    let slow = slow_backend(Duration::from_millis(600)).await;
    let text = cfg(&dir, 30.0, &[&b], &[&placeholder], "", "")
        .replace(&placeholder.addr.to_string(), &slow.to_string());
    let (app, proxy) = start_app(&text).await;
    let load = Load::start(proxy, 8, "/");
    assert!(
        eventually(Duration::from_secs(8), || candidate_bp(&app) == 0).await,
        "rolled back"
    );
    let latch = app
        .server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .rolled_back
        .clone()
        .unwrap();
    assert!(latch.reason.starts_with("latency"), "{}", latch.reason);
    load.stop().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_4xx_is_not_a_failure() {
    let dir = TempDir::new("4xx");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start_app(&cfg(&dir, 30.0, &[&b], &[&g], "", "")).await;
    g.force_status.store(404, Ordering::SeqCst);
    let load = Load::start(proxy, 4, "/");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, c4, _, _) = load.stop().await;
    assert!(c4 > 50);
    assert_eq!(candidate_bp(&app), 3000, "4xx never roll back");
    let t = app.server.table.load();
    assert_eq!(
        t.service("gateway")
            .unwrap()
            .pool(Color::Green)
            .eligible
            .len(),
        1,
        "nor eject"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_colors_failing_holds_traffic_where_it_is() {
    let dir = TempDir::new("both");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start_app(&cfg(
        &dir,
        50.0,
        &[&b],
        &[&g],
        "",
        "[service.health]\neject_after = 0",
    ))
    .await;
    b.force_status.store(503, Ordering::SeqCst);
    g.force_status.store(503, Ordering::SeqCst);
    let load = Load::start(proxy, 4, "/");
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &app.server,
            "cyan_rollbacks_held_total",
            &[]
        ) >= 1.0)
        .await
    );
    load.stop().await;
    assert_eq!(
        candidate_bp(&app),
        5000,
        "no rollback onto a failing stable color"
    );
    assert_eq!(metric(&app.server, "cyan_rollbacks_total", &[]), 0.0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_endpoints_out_and_back() {
    let dir = TempDir::new("active");
    let (b, g1, g2) = (
        Backend::start("blue").await,
        Backend::start("green").await,
        Backend::start("green").await,
    );
    let health = "[service.health]\npath = \"/status/200\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\n[service.rollback]\nenabled = false";
    let (app, proxy) = start_app(&cfg(&dir, 100.0, &[&b], &[&g1, &g2], "", health)).await;
    let green_eligible = |app: &App| {
        app.server
            .table
            .load()
            .service("gateway")
            .unwrap()
            .pool(Color::Green)
            .eligible
            .len()
    };
    g1.force_status.store(503, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || green_eligible(&app) == 1).await,
        "g1 marked down"
    );
    // Traffic avoids it.
    let before = g1.hits();
    let client = h1_client();
    for _ in 0..50 {
        let (s, _, _) = get(&client, proxy, "/", &[]).await;
        assert_eq!(s, 200);
    }
    assert!(
        g1.hits() - before < 10,
        "only probes reach the down endpoint"
    );
    assert!(
        metric(
            &app.server,
            "cyan_health_checks_total",
            &["result=\"failure\""]
        ) >= 2.0
    );
    g1.force_status.store(0, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || green_eligible(&app) == 2).await,
        "g1 back up"
    );
    let (_, v) = call(
        &Target::Socket(dir.join("admin.sock")),
        Method::GET,
        "/v1/events",
        None,
    )
    .await
    .unwrap();
    let actions: Vec<String> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions.contains(&"endpoint_down".to_string())
            && actions.contains(&"endpoint_up".to_string()),
        "{actions:?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_then_fallback_and_fast_503() {
    let dir = TempDir::new("passive");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.health]\neject_after = 3\neject_for = \"30s\"\n[service.rollback]\nenabled = false";
    let (app, proxy) = start_app(&cfg(&dir, 100.0, &[&b], &[&g], "", tables)).await;
    let client = h1_client();
    g.stop(); // green dies
              // Connect failures retry on blue, then green is ejected and the pool
              // falls back to blue without even trying.
    for _ in 0..20 {
        let (s, _, body) = get(&client, proxy, "/", &[]).await;
        assert_eq!((s.as_u16(), color_of(&body)), (200, "blue"));
    }
    assert!(
        eventually(Duration::from_secs(2), || {
            app.server
                .table
                .load()
                .service("gateway")
                .unwrap()
                .pool(Color::Green)
                .eligible
                .is_empty()
        })
        .await
    );
    // Green is empty at 100 %: the other color takes the requests.
    for _ in 0..20 {
        let (s, _, body) = get(&client, proxy, "/", &[]).await;
        assert_eq!(
            (s.as_u16(), color_of(&body)),
            (200, "blue"),
            "fallback to the healthy color"
        );
    }
    assert_eq!(
        metric(&app.server, "cyan_retries_total", &[]) as usize,
        metric(
            &app.server,
            "cyan_upstream_errors_total",
            &["kind=\"connect\""]
        ) as usize
    );
    // Both colors out: a fast 503 with Retry-After, never a hang.
    let sock = Target::Socket(dir.join("admin.sock"));
    call(
        &sock,
        Method::POST,
        &format!("/v1/services/gateway/endpoints/{}/drain", b.addr),
        None,
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let (s, h, _) = get(&client, proxy, "/", &[]).await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    assert!(t0.elapsed() < Duration::from_millis(200));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_runs_to_promotion() {
    let dir = TempDir::new("rollout");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.rollout]\nsteps = [10, 50, 100]\nhold = \"400ms\"\nmin_requests = 5";
    let (app, proxy) = start_app(&cfg(&dir, 0.0, &[&b], &[&g], "", tables)).await;
    let load = Load::start(proxy, 4, "/");
    let sock = Target::Socket(dir.join("admin.sock"));
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        Some(json!({"reason": "upgrade 3.4"})),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["service"]["candidate_percent"], 10.0);
    assert_eq!(v["service"]["rollout"]["step"], 0);
    assert!(
        eventually(Duration::from_secs(10), || {
            let t = app.server.table.load();
            let s = t.service("gateway").unwrap();
            s.split.stable == Color::Green && s.rollout.is_none()
        })
        .await,
        "promoted"
    );
    let (ok, _, c5, broken) = load.stop().await;
    assert_eq!((c5, broken), (0, 0));
    assert!(ok > 100);
    let (_, v) = call(&sock, Method::GET, "/v1/events", None).await.unwrap();
    let actions: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["rollout_start", "rollout_step", "rollout_step"]);
    assert_eq!(v["events"][1]["origin"], "rollout");
    assert!(v["events"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("candidate requests"));
    assert_eq!(metric(&app.server, "cyan_rollout_step", &[]), -1.0);
    app.shutdown().await;
}

/// A candidate endpoint marked down by health checks during a step restarts
/// the step's hold. Green's health check fails for 250 ms of every 600 ms
/// (its traffic stays fine); rollback is off, so only the hold decides.
/// The 1 s step must not advance while the blips go on, though evaluations
/// that find green up see a healthy analysis; once green stays up, the step
/// holds 1 s clean and the rollout promotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_going_down_restarts_the_step_hold() {
    let dir = TempDir::new("rollout-blips");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.health]\npath = \"/probe\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 1\nfall = 1\neject_after = 0\n[service.rollback]\nenabled = false\n[service.rollout]\nsteps = [10, 100]\nhold = \"1s\"\nmin_requests = 5";
    let (app, proxy) = start_app(&cfg(&dir, 0.0, &[&b], &[&g], "", tables)).await;
    let load = Load::start(proxy, 4, "/");
    let sock = Target::Socket(dir.join("admin.sock"));
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");
    let share = |app: &App| {
        let t = app.server.table.load();
        let s = t.service("gateway").unwrap();
        (s.split.stable, s.split.candidate_bp)
    };
    // 6 blips over 3.6 s, the split sampled every 10 ms meanwhile.
    let mut seen = Vec::new();
    let mut last_blip = Instant::now();
    for _ in 0..6 {
        last_blip = Instant::now();
        g.probe_status.store(503, Ordering::SeqCst);
        for _ in 0..25 {
            seen.push(share(&app));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        g.probe_status.store(0, Ordering::SeqCst);
        for _ in 0..35 {
            seen.push(share(&app));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        seen.iter().all(|&s| s == (Color::Blue, 1000)),
        "the step stays at 10 % while green blips: {:?}",
        seen.iter()
            .filter(|&&s| s != (Color::Blue, 1000))
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(
        eventually(Duration::from_secs(6), || share(&app).0 == Color::Green).await,
        "promoted once green stays up"
    );
    // Green went down after `last_blip`; a clean 1 s hold follows that.
    let took = last_blip.elapsed();
    assert!(
        took >= Duration::from_millis(950),
        "the hold ran clean from green's last blip: promoted {took:?} after it"
    );
    let (_, c5, broken) = {
        let (ok, _, c5, broken) = load.stop().await;
        assert!(ok > 100);
        (ok, c5, broken)
    };
    assert_eq!((c5, broken), (0, 0));
    let (_, v) = call(&sock, Method::GET, "/v1/events?since=0&limit=1000", None)
        .await
        .unwrap();
    let events = v["events"].as_array().unwrap();
    let downs = events
        .iter()
        .filter(|e| e["action"] == "endpoint_down")
        .count();
    assert!(
        downs >= 5,
        "green's blips were seen: {downs} endpoint_down events"
    );
    let hold = events
        .iter()
        .find(|e| e["action"] == "rollout_hold")
        .expect("the held step is audited");
    assert!(
        hold["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ago; the hold counts from then")
                || r.contains("analysis bad (candidate_unhealthy")),
        "the hold note says why: {hold}"
    );
    let promoted = events
        .iter()
        .find(|e| e["action"] == "rollout_step")
        .expect("the promotion is audited");
    assert!(
        promoted["reason"].as_str().unwrap().contains("clean"),
        "{promoted}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_step_is_rolled_back_and_ended() {
    let dir = TempDir::new("rollout-fail");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.rollout]\nsteps = [25, 100]\nhold = \"10s\"\nmin_requests = 5";
    let (app, proxy) = start_app(&cfg(&dir, 0.0, &[&b], &[&g], "", tables)).await;
    let sock = Target::Socket(dir.join("admin.sock"));
    call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        None,
    )
    .await
    .unwrap();
    g.force_status.store(502, Ordering::SeqCst);
    let load = Load::start(proxy, 4, "/");
    assert!(eventually(Duration::from_secs(5), || candidate_bp(&app) == 0).await);
    load.stop().await;
    let t = app.server.table.load();
    let s = t.service("gateway").unwrap();
    assert!(s.rollout.is_none(), "the rollback ended the rollout");
    assert!(s.rolled_back.is_some());
    assert_eq!(s.split.stable, Color::Blue);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_rollout_continues_its_step() {
    let dir = TempDir::new("rollout-restart");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.rollout]\nsteps = [10, 40, 100]\nhold = \"1500ms\"\nmin_requests = 5";
    let text = cfg(&dir, 0.0, &[&b], &[&g], "", tables);
    let (app, proxy) = start_app(&text).await;
    let sock = Target::Socket(dir.join("admin.sock"));
    let load = Load::start(proxy, 4, "/");
    call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        None,
    )
    .await
    .unwrap();
    let step = |app: &App| {
        app.server
            .table
            .load()
            .service("gateway")
            .unwrap()
            .rollout
            .as_ref()
            .map(|r| r.step)
    };
    assert!(eventually(Duration::from_secs(6), || step(&app) == Some(1)).await);
    load.stop().await;
    let started = app
        .server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .rollout
        .clone()
        .unwrap()
        .step_started_ms;
    app.shutdown().await;

    let (app, proxy) = start_app(&text).await;
    let r = app
        .server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .rollout
        .clone()
        .expect("rollout persisted");
    assert_eq!(r.step, 1, "continues from its step, not from the beginning");
    assert_eq!(r.step_started_ms, started, "with its timer");
    assert_eq!(candidate_bp(&app), 4000);
    // Without traffic it does not skip ahead, however long it waits.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(step(&app), Some(1));
    // ...and the audit log says why it holds.
    let (_, v) = call(&sock, Method::GET, "/v1/events?since=0&limit=100", None)
        .await
        .unwrap();
    let hold = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "rollout_hold")
        .cloned()
        .expect("hold audited");
    assert!(
        hold["reason"]
            .as_str()
            .unwrap()
            .contains("candidate requests"),
        "{hold}"
    );
    let load = Load::start(proxy, 4, "/");
    assert!(
        eventually(Duration::from_secs(8), || {
            app.server
                .table
                .load()
                .service("gateway")
                .unwrap()
                .split
                .stable
                == Color::Green
        })
        .await,
        "then completes"
    );
    load.stop().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_preflight_blocks_the_start() {
    let dir = TempDir::new("preflight");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let tables = "[service.rollout]\nsteps = [5, 100]\nhold = \"1m\"\n[[service.rollout.preflight]]\npath = \"/status/200\"\n[[service.rollout.preflight]]\nmethod = \"POST\"\npath = \"/echo-headers\"\nheaders = { x-test = \"1\" }\nexpect = [200]";
    let (app, _) = start_app(&cfg(&dir, 0.0, &[&b], &[&g], "", tables)).await;
    let sock = Target::Socket(dir.join("admin.sock"));
    g.force_status.store(500, Ordering::SeqCst);
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("status 500"), "{v}");
    assert_eq!(candidate_bp(&app), 0, "no traffic moved");
    assert!(app
        .server
        .table
        .load()
        .service("gateway")
        .unwrap()
        .rollout
        .is_none());
    let (_, ev) = call(&sock, Method::GET, "/v1/events", None).await.unwrap();
    assert_eq!(ev["events"][0]["action"], "rollout_preflight_failed");
    g.force_status.store(0, Ordering::SeqCst);
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/start",
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(candidate_bp(&app), 500);
    // Pause, resume, abort.
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/pause",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (s.as_u16(), v["service"]["rollout"]["paused"].as_bool()),
        (200, Some(true))
    );
    call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/resume",
        None,
    )
    .await
    .unwrap();
    let (s, v) = call(
        &sock,
        Method::POST,
        "/v1/services/gateway/rollout/abort",
        Some(json!({"reason": "not today"})),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    assert_eq!(v["service"]["candidate_percent"], 0.0);
    assert!(v["service"]["rollout"].is_null());
    app.shutdown().await;
}
