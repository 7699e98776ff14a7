//! End-to-end scenarios of the control plane: the admin API over its Unix
//! socket and TCP, generations and conflicts, permissions, persistence across
//! restarts, reloads under load, and the binary's signals.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use cyan::app::App;
use cyan::config::Config;
use cyan::ctl::{call, Target};
use rustls_pki_types::CertificateDer;
use support::*;

/// A service config with an admin socket and a state dir in `dir`.
fn cp_config(dir: &Path, percent: f64, admin_extra: &str, b: &Backend, g: &Backend) -> String {
    app_config(dir, percent, &[b], &[g], admin_extra, "", "")
}

async fn admin(dir: &Path, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    call(&Target::Socket(dir.join("admin.sock")), method, path, body)
        .await
        .expect("admin API answers")
}

/// Polls `GET path` on the admin socket in `dir` (every 50 ms, 5 s at most)
/// until `done` holds for the answer.
async fn admin_eventually(dir: &Path, path: &str, done: impl Fn(&Value) -> bool) -> bool {
    for _ in 0..100 {
        let (_, v) = admin(dir, Method::GET, path, None).await;
        if done(&v) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn raw_admin(dir: &Path, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(dir.join("admin.sock"))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_changes_the_split_with_generation_guards() {
    let dir = TempDir::new("api");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start_app(&cp_config(&dir, 0.0, "", &b, &g)).await;

    let (s, v) = admin(&dir, Method::GET, "/v1/status", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["services"][0]["candidate_percent"], 0.0);

    let (s, v) = admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 100, "if_generation": 1, "reason": "all in"})),
    )
    .await;
    assert_eq!((s.as_u16(), v["result"].as_str()), (200, Some("applied")));
    assert_eq!(v["generation"], 2);
    let (_, _, body) = get(&h1_client(), proxy, "/", &[]).await;
    assert_eq!(color_of(&body), "green", "the new split is live");

    // A stale generation changes nothing.
    let (s, v) = admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 5, "if_generation": 1})),
    )
    .await;
    assert_eq!(s, 409);
    assert_eq!(v["current_generation"], 2);
    assert_eq!(v["field"], "if_generation");
    let (_, v) = admin(&dir, Method::GET, "/v1/services/gateway", None).await;
    assert_eq!(v["candidate_percent"], 100.0);
    assert_eq!(v["generation"], 2);

    // Promote: green becomes stable with all traffic; rollback is then a no-op.
    let (s, v) = admin(&dir, Method::POST, "/v1/services/gateway/promote", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["service"]["stable"], "green");
    assert_eq!(v["service"]["candidate"], "blue");
    assert_eq!(v["service"]["candidate_percent"], 0.0);
    let (_, v) = admin(
        &dir,
        Method::POST,
        "/v1/services/gateway/rollback",
        Some(json!({})),
    )
    .await;
    assert_eq!(v["result"], "no_change");

    // Drain and undrain.
    let path = format!("/v1/services/gateway/endpoints/{}/drain", g.addr);
    let (s, v) = admin(
        &dir,
        Method::POST,
        &path,
        Some(json!({"reason": "patching"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        v["service"]["pools"]["green"]["endpoints"][0]["state"],
        "drained"
    );
    // Green's only endpoint is drained: the request falls back to blue.
    let (s, _, body) = get(&h1_client(), proxy, "/", &[]).await;
    assert_eq!((s.as_u16(), color_of(&body)), (200, "blue"));
    let path = format!("/v1/services/gateway/endpoints/{}/undrain", g.addr);
    assert_eq!(admin(&dir, Method::POST, &path, None).await.0, 200);

    // Every change is in the audit log with its actor and reason.
    let (_, v) = admin(&dir, Method::GET, "/v1/events?since=0", None).await;
    let events = v["events"].as_array().unwrap();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["set_split", "promote", "drain", "undrain"]);
    let me = format!("uid:{}", rustix::process::getuid().as_raw());
    assert!(
        events[0]["actor"].as_str().unwrap().starts_with(&me),
        "{}",
        events[0]
    );
    assert_eq!(events[0]["reason"], "all in");
    assert_eq!(events[0]["before"]["candidate_percent"], 0.0);
    assert_eq!(events[0]["after"]["candidate_percent"], 100.0);
    assert_eq!(events[2]["reason"], "patching");
    let (_, v) = admin(&dir, Method::GET, "/v1/events?since=3", None).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);

    // The whole table.
    let (s, v) = admin(&dir, Method::GET, "/v1/table", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["services"][0]["pools"]["blue"]["upstream"]["protocol"],
        "http1"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_requests_change_nothing() {
    let dir = TempDir::new("bad");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start_app(&cp_config(&dir, 10.0, "max_body_bytes = 1024", &b, &g)).await;
    let split = "/v1/services/gateway/split";
    // (method, path, body, expected status, expected `field`)
    type Case<'a> = (Method, &'a str, Option<Value>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            Method::PUT,
            split,
            Some(json!({"candidate_percent": 101})),
            400,
            Some("candidate_percent"),
        ),
        (
            Method::PUT,
            split,
            Some(json!({"candidate_percent": 1.234})),
            400,
            Some("candidate_percent"),
        ),
        (
            Method::PUT,
            split,
            Some(json!({"candidate_percnt": 5})),
            400,
            Some("candidate_percnt"),
        ),
        (
            Method::PUT,
            split,
            Some(json!({"candidate_percent": "5"})),
            400,
            None,
        ),
        (Method::PUT, split, None, 400, None),
        (
            Method::POST,
            split,
            Some(json!({"candidate_percent": 5})),
            405,
            None,
        ),
        (
            Method::PUT,
            "/v1/services/nope/split",
            Some(json!({"candidate_percent": 5})),
            404,
            Some("service"),
        ),
        (
            Method::POST,
            "/v1/services/gateway/endpoints/127.0.0.1:1/drain",
            None,
            404,
            Some("address"),
        ),
        (
            Method::POST,
            "/v1/services/gateway/endpoints/not-an-addr/drain",
            None,
            400,
            Some("address"),
        ),
        (Method::GET, "/v1/nothing-here", None, 404, None),
        (Method::DELETE, "/v1/status", None, 405, None),
        (
            Method::GET,
            "/v1/events?since=abc",
            None,
            400,
            Some("since"),
        ),
    ];
    for (m, path, body, status, field) in cases {
        let (s, v) = admin(&dir, m.clone(), path, body.clone()).await;
        assert_eq!(s.as_u16(), status, "{m} {path} {body:?}: {v}");
        assert!(v["error"].is_string(), "{v}");
        if let Some(f) = field {
            assert_eq!(v["field"], f, "{m} {path}: {v}");
        }
    }
    // Malformed JSON and an oversize body.
    let out = raw_admin(&dir, b"PUT /v1/services/gateway/split HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{\"candid").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let big = format!(
        "{{\"candidate_percent\": 5, \"reason\": \"{}\"}}",
        "x".repeat(4000)
    );
    let req = format!(
        "PUT /v1/services/gateway/split HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    let out = raw_admin(&dir, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Garbage on the socket: no panic, the API still answers.
    let out = raw_admin(&dir, b"\x16\x03\x01garbage\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400") || out.is_empty(), "{out:?}");

    let (_, v) = admin(&dir, Method::GET, "/v1/status", None).await;
    assert_eq!(v["generation"], 1, "nothing changed");
    assert_eq!(v["services"][0]["candidate_percent"], 10.0);
    let (_, v) = admin(&dir, Method::GET, "/v1/events", None).await;
    assert!(v["events"].as_array().unwrap().is_empty());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_never_stolen() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = TempDir::new("sock");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let sock = dir.join("admin.sock");
    // A stale socket from a crash is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let text = cp_config(&dir, 0.0, "", &b, &g);
    let (app, _) = start_app(&text).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A live one is not taken over.
    let cfg = Config::parse(&text).unwrap();
    let err = App::start(cfg, None, false).await.unwrap_err();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(
        admin(&dir, Method::GET, "/v1/status", None).await.0,
        200,
        "the first instance still answers"
    );
    app.shutdown().await;

    // A path that is not a socket is never deleted.
    let dir2 = TempDir::new("notsock");
    std::fs::write(dir2.join("admin.sock"), b"precious").unwrap();
    let cfg = Config::parse(&cp_config(&dir2, 0.0, "", &b, &g)).unwrap();
    let err = App::start(cfg, None, false).await.unwrap_err();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(dir2.join("admin.sock")).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_uid_allowlist_are_refused() {
    let dir = TempDir::new("uid");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start_app(&cp_config(&dir, 0.0, "allowed_uids = [54321]", &b, &g)).await;
    let (s, v) = admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 50})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = admin(&dir, Method::GET, "/v1/status", None).await;
    assert_eq!(s, 403);
    assert_eq!(
        app.server
            .table
            .load()
            .service("gateway")
            .unwrap()
            .split
            .candidate_bp,
        0
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tokens_have_roles() {
    let dir = TempDir::new("tokens");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    std::fs::write(dir.join("ops.token"), "operate-secret\n").unwrap();
    let read_hash: String = cyan::config::sha256(b"read-secret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extra = format!(
        "listen = \"127.0.0.1:0\"\ntokens = [{{ name = \"viewer\", role = \"read\", sha256 = \"{read_hash}\" }}, {{ name = \"ops\", role = \"operate\", file = \"{}\" }}]",
        dir.join("ops.token").display()
    );
    let (app, _) = start_app(&cp_config(&dir, 0.0, &extra, &b, &g)).await;
    let base = format!("http://{}", app.admin.as_ref().unwrap().tcp_addr.unwrap());
    let target = |token: &str| Target::Url {
        base: base.clone(),
        token: token.into(),
    };
    let split = Some(json!({"candidate_percent": 20}));
    let path = "/v1/services/gateway/split";
    assert_eq!(
        call(&target(""), Method::GET, "/v1/status", None)
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        call(&target("wrong"), Method::GET, "/v1/status", None)
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        call(&target("read-secret"), Method::GET, "/v1/status", None)
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        call(&target("read-secret"), Method::PUT, path, split.clone())
            .await
            .unwrap()
            .0,
        403
    );
    assert_eq!(
        app.server.table.load().generation,
        1,
        "read role changed nothing"
    );
    let (s, v) = call(&target("operate-secret"), Method::PUT, path, split)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let (_, v) = call(&target("read-secret"), Method::GET, "/v1/events", None)
        .await
        .unwrap();
    assert_eq!(v["events"][0]["actor"], "token:ops");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_storm_under_load_fails_no_request() {
    let dir = TempDir::new("storm");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start_app(&cp_config(&dir, 50.0, "", &b, &g)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for w in 0..6 {
        let (stop, failed, served) = (stop.clone(), failed.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let client = h1_client();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let payload = format!("w{w}-{i}-").repeat(40);
                let req = http::Request::post(format!("http://{proxy}/upload"))
                    .header(DIGEST, digest_hex(payload.as_bytes()))
                    .body(full(payload))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => served.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                i += 1;
            }
        }));
    }
    let changes = 1500;
    for i in 0..changes {
        let pct = (i * 7 % 101) as f64;
        let (s, _) = admin(
            &dir,
            Method::PUT,
            "/v1/services/gateway/split",
            Some(json!({"candidate_percent": pct})),
        )
        .await;
        assert_eq!(s, 200, "change {i} acknowledged");
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed during {changes} changes"
    );
    assert!(served.load(Ordering::SeqCst) > 500);
    let (_, v) = admin(&dir, Method::GET, "/v1/events?since=0&limit=10000", None).await;
    let n = v["events"].as_array().unwrap().len();
    assert!(n > 1400, "{n} audited changes");

    // The observed share follows the configured one.
    admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 30})),
    )
    .await;
    let (gb, gg) = (b.hits(), g.hits());
    let client = h1_client();
    // 4000 draws at 30 %: one standard deviation is 0.72 points, so ±3.5
    // points is ~4.8 sd — a real skew fails, chance does not.
    for _ in 0..4000 {
        get(&client, proxy, "/", &[]).await;
    }
    let green = (g.hits() - gg) as f64 / ((b.hits() - gb) + (g.hits() - gg)) as f64;
    assert!((green - 0.30).abs() < 0.035, "observed {green}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_persisted_state() {
    let dir = TempDir::new("restart");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let text = cp_config(&dir, 5.0, "", &b, &g);
    let (app, _) = start_app(&text).await;
    admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 37.5, "reason": "step 4"})),
    )
    .await;
    admin(
        &dir,
        Method::POST,
        &format!("/v1/services/gateway/endpoints/{}/drain", b.addr),
        None,
    )
    .await;
    let gen_before = app.server.table.load().generation;
    app.shutdown().await;

    let (app, proxy) = start_app(&text).await;
    let (_, v) = admin(&dir, Method::GET, "/v1/services/gateway", None).await;
    assert_eq!(
        v["candidate_percent"], 37.5,
        "the state file wins over the config's 5 %"
    );
    assert_eq!(v["pools"]["blue"]["endpoints"][0]["state"], "drained");
    assert!(v["generation"].as_u64().unwrap() > gen_before);
    let (_, v) = admin(&dir, Method::GET, "/v1/events", None).await;
    assert_eq!(
        v["events"].as_array().unwrap().len(),
        2,
        "the audit history survives"
    );
    // Blue's only endpoint is drained: traffic that draws blue gets 503.
    let (s, _, _) = get(&h1_client(), proxy, "/", &[]).await;
    assert!(s == 200 || s == 503);
    app.shutdown().await;

    // A corrupt state file stops the start, naming the file and the way out.
    std::fs::write(dir.join("state").join("state.json"), b"{ not json").unwrap();
    let err = App::start(Config::parse(&text).unwrap(), None, false)
        .await
        .unwrap_err();
    assert!(
        err.contains("state.json") && err.contains("--fresh-state"),
        "{err}"
    );
    let app = App::start(Config::parse(&text).unwrap(), None, true)
        .await
        .expect("--fresh-state starts");
    assert_eq!(
        app.server
            .table
            .load()
            .service("gateway")
            .unwrap()
            .split
            .candidate_bp,
        500
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_keep_the_split_and_reject_bad_configs() {
    let dir = TempDir::new("reload");
    let (b, g, g2) = (
        Backend::start("blue").await,
        Backend::start("green").await,
        Backend::start("green").await,
    );
    let path = dir.join("cyan.toml");
    let text = cp_config(&dir, 0.0, "", &b, &g);
    std::fs::write(&path, &text).unwrap();
    let app = App::start(Config::load(&path).unwrap(), Some(path.clone()), false)
        .await
        .unwrap();
    let proxy = app.server.local_addr("public").unwrap();
    admin(
        &dir,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 100})),
    )
    .await;

    let load = Load::start(proxy, 4, "/");
    // Valid reloads: green grows a second endpoint; the operator's 100 % stays.
    let grown = text.replace(
        &format!("green = {{ endpoints = [\"{}\"] }}", g.addr),
        &format!(
            "green = {{ endpoints = [\"{}\", \"{}\"] }}",
            g.addr, g2.addr
        ),
    );
    assert_ne!(grown, text);
    for i in 0..20 {
        std::fs::write(&path, if i % 2 == 0 { &grown } else { &text }).unwrap();
        let (s, v) = admin(&dir, Method::POST, "/v1/reload", None).await;
        assert_eq!(s, 200, "{v}");
    }
    std::fs::write(&path, &grown).unwrap();
    admin(&dir, Method::POST, "/v1/reload", None).await;
    let t = app.server.table.load();
    let svc = t.service("gateway").unwrap();
    assert_eq!(
        svc.split.candidate_bp, 10_000,
        "the live split survives reloads"
    );
    assert_eq!(svc.pool(cyan::config::Color::Green).endpoints.len(), 2);
    let generation = t.generation;

    // Invalid reloads: syntax error, bad value, a file truncated mid-write
    // (cut inside a key), unreadable file.
    let cut = text.find("candidate_percent").unwrap() + "candidate_pe".len();
    let bad = [
        text.replace("[[service]]", "[[service]"),
        text.replace("candidate_percent = 0", "candidate_percent = 300"),
        text[..cut].to_string(),
    ];
    for b in &bad {
        std::fs::write(&path, b).unwrap();
        let (s, v) = admin(&dir, Method::POST, "/v1/reload", None).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("nothing changed"));
    }
    std::fs::remove_file(&path).unwrap();
    let (s, v) = admin(&dir, Method::POST, "/v1/reload", None).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("cannot read"), "{v}");
    assert_eq!(
        app.server.table.load().generation,
        generation,
        "the live table is untouched"
    );
    assert_eq!(
        metric(&app.server, "cyan_config_reloads_total", &["failure"]),
        4.0
    );
    assert_eq!(
        metric(&app.server, "cyan_config_reloads_total", &["success"]),
        21.0
    );
    let (_, v) = admin(&dir, Method::GET, "/v1/events?since=0&limit=100", None).await;
    let rejected = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "reload_rejected")
        .count();
    assert_eq!(rejected, 4);

    let (_, not_served, c5, broken) = load.stop().await;
    assert_eq!(
        not_served + c5 + broken,
        0,
        "no request failed across reloads"
    );
    assert!(g2.hits() > 0, "the endpoint added by reload took traffic");
    app.shutdown().await;
}

/// `cyan run --config path` (info logs to `stderr`, `env` added), once its
/// admin socket in `dir` is there.
async fn cyan_run(
    path: &Path,
    dir: &Path,
    stderr: std::process::Stdio,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    let mut all = vec![("CYAN_LOG", std::ffi::OsStr::new("info"))];
    all.extend(env.iter().map(|&(k, v)| (k, std::ffi::OsStr::new(v))));
    let child = spawn_cyan_run(path, None, &all, stderr);
    let sock = dir.join("admin.sock");
    assert!(
        eventually(Duration::from_secs(10), || sock.exists()).await,
        "admin socket appears"
    );
    child
}

/// The binary itself: SIGHUP reloads, SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_and_exits_cleanly_on_sigterm() {
    let dir = TempDir::new("bin");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let path = dir.join("cyan.toml");
    let text = cp_config(&dir, 0.0, "", &b, &g);
    std::fs::write(&path, &text).unwrap();
    let child = cyan_run(&path, &dir, std::process::Stdio::piped(), &[]).await;
    let sock = dir.join("admin.sock");
    let (s, v) = admin(&dir, Method::GET, "/v1/status", None).await;
    assert_eq!((s.as_u16(), v["generation"].as_u64()), (200, Some(1)));

    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "name = \"gateway\"",
            "name = \"gateway\"\npath_prefix = \"/api\"",
        ),
    )
    .unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let reloaded = admin_eventually(&dir, "/v1/status", |v| {
        v["services"][0]["path_prefix"] == "/api"
    })
    .await;
    assert!(reloaded, "SIGHUP reloaded the config");

    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(!sock.exists(), "the socket is removed on exit");
    // The log went to a pipe (as to journald under systemd): plain text,
    // no terminal colour codes.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("reload"), "the reload was logged: {log}");
    assert!(
        !log.contains('\x1b'),
        "escape codes in a piped log: {log:?}"
    );
}

/// Under systemd (stderr is the journal stream named by JOURNAL_STREAM) each
/// log line carries its syslog priority, so `journalctl -p err` finds
/// cyan's errors; with stderr anywhere else, lines are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_their_priority_when_stderr_is_the_journal() {
    use std::io::Read;
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    for journal in [true, false] {
        let dir = TempDir::new(if journal { "journal" } else { "no-journal" });
        let path = dir.join("cyan.toml");
        let text = cp_config(&dir, 0.0, "", &b, &g);
        std::fs::write(&path, &text).unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        let st = rustix::fs::fstat(&writer).unwrap();
        let stream = if journal {
            format!("{}:{}", st.st_dev, st.st_ino)
        } else {
            format!("{}:{}", st.st_dev, st.st_ino + 1)
        };
        let mut child = cyan_run(&path, &dir, writer.into(), &[("JOURNAL_STREAM", &stream)]).await;
        // A rejected reload is logged as an error.
        std::fs::write(&path, text.replace("[[service]]", "[[service]")).unwrap();
        let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        let rejected = admin_eventually(&dir, "/v1/events?since=0&limit=100", |v| {
            v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["action"] == "reload_rejected"))
        })
        .await;
        assert!(rejected, "SIGHUP with a broken config was rejected");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits")
            .unwrap();
        assert!(status.success(), "{status:?}");
        let mut log = String::new();
        reader.read_to_string(&mut log).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with(' ')).collect();
        assert!(lines.len() >= 3, "{log}");
        let rejected = lines
            .iter()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("the rejected reload was logged as an error: {log}"));
        if journal {
            assert!(rejected.starts_with("<3>"), "{rejected}");
            assert!(
                lines
                    .iter()
                    .filter(|l| l.contains(" INFO "))
                    .all(|l| l.starts_with("<6>")),
                "{log}"
            );
            assert!(
                lines.iter().all(|l| l.starts_with('<')),
                "every line has a priority: {log}"
            );
        } else {
            assert!(!log.contains("<3>") && !log.contains("<6>"), "{log}");
        }
    }
}

/// A keep-alive HTTP/1.1 sender over TLS to `proxy` with SNI `reload.test`,
/// and the certificate the server presented.
async fn tls_keepalive(
    connector: &tokio_rustls::TlsConnector,
    proxy: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<BoxBody>,
    Vec<u8>,
    tokio::task::JoinHandle<()>,
) {
    let s = tls_connect(connector, proxy, "reload.test")
        .await
        .expect("TLS handshake");
    let peer = s
        .get_ref()
        .1
        .peer_certificates()
        .expect("a peer certificate")[0]
        .to_vec();
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("h1 over TLS");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (tx, peer, conn)
}

async fn tls_get(tx: &mut hyper::client::conn::http1::SendRequest<BoxBody>) -> (u16, String) {
    tx.ready().await.expect("the connection is still usable");
    let req = http::Request::get("/")
        .header("host", "reload.test")
        .body(empty())
        .unwrap();
    let resp = tx
        .send_request(req)
        .await
        .expect("request on the open connection");
    let status = resp.status().as_u16();
    (status, body_text(resp).await)
}

/// The certificate a full handshake is given. The connector is new each
/// time: with a session cache the client would resume its earlier session,
/// and a resumed TLS session reports the certificate of the session it
/// resumes, not the one the server holds now.
async fn presented_cert(
    roots: &[&CertificateDer<'static>],
    proxy: std::net::SocketAddr,
) -> Vec<u8> {
    let s = tls_connect(&fresh_connector(roots), proxy, "reload.test")
        .await
        .expect("TLS handshake");
    s.get_ref()
        .1
        .peer_certificates()
        .expect("a peer certificate")[0]
        .to_vec()
}

fn fresh_connector(roots: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    tls_connector(
        roots,
        &[b"http/1.1"],
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

/// A reload swaps the listener's certificate for new handshakes while an
/// open TLS connection keeps serving; a bad certificate rejects the reload
/// whole and the last good one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_connections() {
    let dir = TempDir::new("cert-reload");
    let certs = TempDir::new("cert-material");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (a, a_not_after) =
        TestCert::generate_expiring(certs.path(), "a", &["reload.test"], (2041, 1, 1));
    let (bc, b_not_after) =
        TestCert::generate_expiring(certs.path(), "b", &["reload.test"], (2045, 6, 15));
    assert_ne!(a.der, bc.der);
    assert_ne!(a_not_after, b_not_after);
    assert_ne!(
        std::fs::read(&a.key_path).unwrap(),
        std::fs::read(&bc.key_path).unwrap(),
        "cert B has its own key"
    );
    // The config names fixed paths whose contents the test replaces.
    let (live_cert, live_key) = (dir.path().join("live.pem"), dir.path().join("live.key"));
    std::fs::copy(&a.cert_path, &live_cert).unwrap();
    std::fs::copy(&a.key_path, &live_key).unwrap();
    let listen = "name = \"public\"\nlisten = \"127.0.0.1:0\"\n";
    let text = cp_config(dir.path(), 0.0, "", &b, &g).replacen(
        listen,
        &format!(
            "{listen}tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            live_cert.display(),
            live_key.display()
        ),
        1,
    );
    assert!(text.contains("tls = {"), "{text}");
    let path = dir.path().join("cyan.toml");
    std::fs::write(&path, &text).unwrap();
    let app = App::start(Config::load(&path).unwrap(), Some(path.clone()), false)
        .await
        .expect("app starts");
    let proxy = app.server.local_addr("public").unwrap();
    let not_after = || {
        metric(
            &app.server,
            "cyan_tls_cert_not_after_timestamp_seconds",
            &["listener=\"public\""],
        )
    };
    assert_eq!(
        not_after(),
        a_not_after as f64,
        "the gauge is cert A's notAfter"
    );

    // The client trusts both certificates, so only the server's choice matters.
    let roots = [&a.der, &bc.der];
    let (mut old, old_peer, old_conn) = tls_keepalive(&fresh_connector(&roots), proxy).await;
    assert_eq!(old_peer, a.der.to_vec(), "cert A before the reload");
    assert_eq!(tls_get(&mut old).await.0, 200);

    // Swap in cert B (a different key, the same name) and reload.
    std::fs::copy(&bc.cert_path, &live_cert).unwrap();
    std::fs::copy(&bc.key_path, &live_key).unwrap();
    let (s, v) = admin(dir.path(), Method::POST, "/v1/reload", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["result"], "reloaded");

    // The open connection goes on: several more requests, same connection.
    for i in 0..3 {
        let (status, body) = tls_get(&mut old).await;
        assert_eq!(status, 200, "request {i} after the reload: {body}");
        assert_eq!(color_of(&body), "blue");
    }
    assert!(!old_conn.is_finished(), "the old connection is still open");
    // A new connection is given cert B.
    assert_eq!(
        presented_cert(&roots, proxy).await,
        bc.der.to_vec(),
        "new handshakes see cert B"
    );
    let (mut fresh, fresh_peer, _fresh_conn) = tls_keepalive(&fresh_connector(&roots), proxy).await;
    assert_eq!(fresh_peer, bc.der.to_vec());
    assert_eq!(tls_get(&mut fresh).await.0, 200);
    assert_eq!(not_after(), b_not_after as f64, "the gauge follows cert B");
    let generation = app.server.table.load().generation;

    // Bad certificates: garbage, a key that does not fit, a missing file.
    // Each reload is refused whole; cert B keeps being served.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases: Vec<(&str, String)> = vec![
        (
            "garbage certificate",
            text.replace(
                &live_cert.display().to_string(),
                &garbage.display().to_string(),
            ),
        ),
        (
            "key of another certificate",
            text.replace(
                &live_key.display().to_string(),
                &a.key_path.display().to_string(),
            ),
        ),
        (
            "missing certificate file",
            text.replace(
                &live_cert.display().to_string(),
                &dir.path().join("nope.pem").display().to_string(),
            ),
        ),
    ];
    for (what, bad) in &cases {
        assert_ne!(bad, &text, "{what}: the config really changed");
        std::fs::write(&path, bad).unwrap();
        let (s, v) = admin(dir.path(), Method::POST, "/v1/reload", None).await;
        assert_eq!(s, 400, "{what}: {v}");
        let err = v["error"].as_str().unwrap_or_default();
        assert!(err.contains("nothing changed"), "{what}: {err}");
        assert_eq!(
            presented_cert(&roots, proxy).await,
            bc.der.to_vec(),
            "{what}: new handshakes still see cert B"
        );
        assert_eq!(
            not_after(),
            b_not_after as f64,
            "{what}: the gauge is unchanged"
        );
        assert_eq!(app.server.table.load().generation, generation, "{what}");
    }
    assert_eq!(
        metric(&app.server, "cyan_config_reloads_total", &["failure"]),
        cases.len() as f64
    );
    // Both connections survived everything.
    assert_eq!(tls_get(&mut old).await.0, 200);
    assert_eq!(tls_get(&mut fresh).await.0, 200);
    assert_eq!(
        metric(&app.server, "cyan_tls_handshake_errors_total", &[]),
        0.0
    );
    drop((old, fresh));
    app.shutdown().await;
}

/// Runs the `cyan` binary with `args`; returns (exit code, stdout, stderr).
async fn cyan_bin(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(support::cyan_exe())
            .args(args)
            .env_remove("CYAN_ADMIN_SOCKET")
            .env("CYAN_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cyan exits within 20 s")
    .expect("cyan runs");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cyan ctl` and `cyan check` as an operator runs them: output and exit
/// codes (0 ok, 1 error, 2 usage, 3 conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_binary_end_to_end() {
    let dir = TempDir::new("ctl-bin");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start_app(&cp_config(dir.path(), 10.0, "", &b, &g)).await;
    let sock = dir.path().join("admin.sock");
    let sock = sock.to_str().unwrap();
    let split_bp = || {
        let t = app.server.table.load();
        (
            t.generation,
            t.service("gateway").unwrap().split.candidate_bp,
        )
    };

    let (code, out, err) = cyan_bin(&["ctl", "--socket", sock, "status"]).await;
    assert_eq!(code, 0, "status: {out}{err}");
    assert!(out.contains("generation 1"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("gateway"))
        .unwrap_or_else(|| panic!("a row for the service: {out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..4], ["gateway", "blue", "green", "10.00%"], "{row}");
    for (color, ep) in [("blue", b.addr), ("green", g.addr)] {
        assert!(
            out.lines().any(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                c.len() >= 3 && c[0] == color && c[1] == ep.to_string() && c[2] == "up"
            }),
            "an endpoint line for {color} {ep}: {out}"
        );
    }

    // `cyan ctl status | head -1`: a reader that leaves early is not an
    // error (the output used to panic on the broken pipe, exit 101).
    for _ in 0..5 {
        let mut child = std::process::Command::new(support::cyan_exe())
            .args(["ctl", "--socket", sock, "status"])
            .env_remove("CYAN_ADMIN_SOCKET")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The read end closes before cyan has its answer to print.
        drop(child.stdout.take());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "status into a closed pipe: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // Output that cannot be written (a full disk) is an error, not silence.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let out = std::process::Command::new(support::cyan_exe())
            .args(["ctl", "--socket", sock, "status"])
            .env_remove("CYAN_ADMIN_SOCKET")
            .stdout(full)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "status into /dev/full: {err}");
        assert!(err.contains("cannot write the answer"), "{err}");
    }

    let (code, out, err) = cyan_bin(&[
        "ctl",
        "--socket",
        sock,
        "split",
        "gateway",
        "25",
        "--reason",
        "ctl-e2e-ramp",
    ])
    .await;
    assert_eq!(code, 0, "split: {out}{err}");
    assert!(out.contains("applied: generation 2"), "{out}");
    assert!(
        out.contains("25.00%"),
        "the service after the change: {out}"
    );
    assert_eq!(split_bp(), (2, 2500));

    // A stale --if-generation: exit 3, nothing changed.
    let (code, out, err) = cyan_bin(&[
        "ctl",
        "--socket",
        sock,
        "split",
        "gateway",
        "30",
        "--if-generation",
        "1",
    ])
    .await;
    assert_eq!(code, 3, "stale generation: {out}{err}");
    assert!(err.contains("409"), "{err}");
    assert_eq!(split_bp(), (2, 2500), "a conflict changes nothing");

    // Out of range: refused by the API, exit 1.
    let (code, out, err) = cyan_bin(&["ctl", "--socket", sock, "split", "gateway", "101"]).await;
    assert_eq!(code, 1, "101%: {out}{err}");
    assert!(err.contains("400"), "{err}");
    assert_eq!(split_bp(), (2, 2500));
    // An unknown service: exit 1.
    let (code, _, err) = cyan_bin(&["ctl", "--socket", sock, "split", "nope", "5"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("404"), "{err}");

    let (code, out, err) = cyan_bin(&["ctl", "--socket", sock, "-o", "json", "status"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["generation"], 2, "{v}");
    assert_eq!(v["services"][0]["candidate_percent"], 25.0, "{v}");

    let (code, out, err) = cyan_bin(&["ctl", "--socket", sock, "events"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one change audited: {out}");
    assert!(
        lines[0].contains("set_split") && lines[0].contains("(ctl-e2e-ramp)"),
        "{out}"
    );
    assert!(lines[0].contains("10.00% -> blue 25.00%"), "{out}");

    let (code, out, err) =
        cyan_bin(&["ctl", "--socket", sock, "rollout", "status", "gateway"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gateway: candidate at 25.00%"), "{out}");
    assert!(out.contains("no rollout running"), "{out}");

    // No cyan behind the socket: exit 1, naming the socket.
    let (code, _, err) = cyan_bin(&["ctl", "--socket", "/nonexistent/x.sock", "status"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/x.sock"), "{err}");
    // Usage errors are clap's: exit 2.
    let (code, _, err) = cyan_bin(&["ctl", "--socket", sock, "split", "gateway"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Usage"), "{err}");
    let (code, _, err) = cyan_bin(&["ctl", "--socket", sock, "split", "gateway", "abc"]).await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(split_bp(), (2, 2500), "nothing changed along the way");

    // `cyan check`.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/cyan.example.toml");
    let (code, out, err) = cyan_bin(&["check", "--config", example]).await;
    assert_eq!(code, 0, "the example config is valid: {out}{err}");
    assert!(out.contains(": ok"), "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            r#"
[runtime]
drain_timeout = "forever"

[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
candidate_percent = 300
blue  = {{ endpoints = ["{}"] }}
green = {{ endpoints = ["{}"] }}
"#,
            b.addr, g.addr
        ),
    )
    .unwrap();
    let (code, out, err) = cyan_bin(&["check", "--config", bad.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}{err}");
    for key in [
        "runtime.drain_timeout",
        "service[gateway].candidate_percent",
    ] {
        assert!(err.contains(key), "names {key}: {err}");
    }
    app.shutdown().await;
}

/// The admin socket's own connection cap: connections over it are closed
/// unanswered, the held ones keep working, a released slot is usable again,
/// and the data path never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connection_cap_sheds_extra_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("admin-cap");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    // A long request timeout, so the held idle connections are not timed out
    // by the server during the test.
    let extra = "max_connections = 2\nrequest_timeout = \"60s\"";
    let (app, proxy) = start_app(&cp_config(dir.path(), 0.0, extra, &b, &g)).await;
    let sock = dir.path().join("admin.sock");
    let status_req = b"GET /v1/status HTTP/1.1\r\nHost: cyan\r\n\r\n";

    // Two connections take both slots: connected, nothing sent.
    let held1 = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut held2 = tokio::net::UnixStream::connect(&sock).await.unwrap();

    // A third is closed without an answer (the accept loop takes them in
    // order, so the first two hold the slots by the time it is accepted).
    let mut third = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let _ = third.write_all(status_req).await; // may fail: already closed
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), third.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("HTTP/"), "no answer over the cap: {text}");
    assert!(
        read.is_ok(),
        "the server closes the extra connection rather than leaving it hanging"
    );
    // The client library sees the same.
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        call(
            &Target::Socket(sock.clone()),
            Method::GET,
            "/v1/status",
            None,
        ),
    )
    .await
    .expect("refused promptly");
    assert!(r.is_err(), "over the cap: {r:?}");

    // The data path is unaffected meanwhile.
    let (s, _, body) = get(&h1_client(), proxy, "/", &[]).await;
    assert_eq!((s.as_u16(), color_of(&body)), (200, "blue"));

    // A held connection is a real, served connection.
    held2.write_all(status_req).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), held2.read(&mut buf))
        .await
        .expect("the held connection is answered")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Releasing one slot lets requests in again.
    drop(held1);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok((s, v)) = call(
            &Target::Socket(sock.clone()),
            Method::GET,
            "/v1/status",
            None,
        )
        .await
        {
            assert_eq!(s, 200, "{v}");
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a released slot is taken by a new connection");
    // And repeatedly so (each call's connection frees its slot on close).
    for i in 0..5 {
        let mut answered = false;
        for _ in 0..100 {
            if let Ok((s, _)) = call(
                &Target::Socket(sock.clone()),
                Method::GET,
                "/v1/status",
                None,
            )
            .await
            {
                assert_eq!(s, 200);
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "call {i} after the release");
    }
    drop(held2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_admin_clients_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("slow-admin");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start_app(&cp_config(&dir, 0.0, "request_timeout = \"300ms\"", &b, &g)).await;
    // A head that never finishes: the connection is closed.
    let mut s = tokio::net::UnixStream::connect(dir.join("admin.sock"))
        .await
        .unwrap();
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHo").await.unwrap();
    let t0 = std::time::Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "closed, not left hanging");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // A body that stalls: 408, and nothing changed.
    let mut s = tokio::net::UnixStream::connect(dir.join("admin.sock"))
        .await
        .unwrap();
    s.write_all(b"PUT /v1/services/gateway/split HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"candidate").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(app.server.table.load().generation, 1);
    app.shutdown().await;
}
