//! End-to-end scenarios of the control plane: the admin API over its Unix
//! socket and TCP, generations and conflicts, permissions, persistence across
//! restarts, reloads under load, and the binary's signals.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use cyan::app::App;
use cyan::config::Config;
use cyan::ctl::{call, Target};
use support::*;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "cyan-cp-{tag}-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A service config with an admin socket and a state dir in `dir`.
fn cp_config(dir: &Path, percent: f64, admin_extra: &str, b: &Backend, g: &Backend) -> String {
    format!(
        r#"
[runtime]
drain_timeout = "5s"

[admin]
socket = "{sock}"
{admin_extra}

[state]
dir = "{state}"

[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
candidate_percent = {percent}
blue  = {{ endpoints = ["{b}"] }}
green = {{ endpoints = ["{g}"] }}
"#,
        sock = dir.join("admin.sock").display(),
        state = dir.join("state").display(),
        b = b.addr,
        g = g.addr,
    )
}

async fn start(text: &str) -> (App, std::net::SocketAddr) {
    let cfg = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(cfg, None, false).await.expect("app starts");
    let addr = app.server.local_addr("public").unwrap();
    (app, addr)
}

async fn admin(dir: &Path, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    call(&Target::Socket(dir.join("admin.sock")), method, path, body)
        .await
        .expect("admin API answers")
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
    let dir = tmpdir("api");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start(&cp_config(&dir, 0.0, "", &b, &g)).await;

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
    let dir = tmpdir("bad");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start(&cp_config(&dir, 10.0, "max_body_bytes = 1024", &b, &g)).await;
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
    let dir = tmpdir("sock");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let sock = dir.join("admin.sock");
    // A stale socket from a crash is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let text = cp_config(&dir, 0.0, "", &b, &g);
    let (app, _) = start(&text).await;
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
    let dir2 = tmpdir("notsock");
    std::fs::write(dir2.join("admin.sock"), b"precious").unwrap();
    let cfg = Config::parse(&cp_config(&dir2, 0.0, "", &b, &g)).unwrap();
    let err = App::start(cfg, None, false).await.unwrap_err();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(dir2.join("admin.sock")).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_uid_allowlist_are_refused() {
    let dir = tmpdir("uid");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, _) = start(&cp_config(&dir, 0.0, "allowed_uids = [54321]", &b, &g)).await;
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
    let dir = tmpdir("tokens");
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
    let (app, _) = start(&cp_config(&dir, 0.0, &extra, &b, &g)).await;
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
    let dir = tmpdir("storm");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let (app, proxy) = start(&cp_config(&dir, 50.0, "", &b, &g)).await;
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
    for _ in 0..2000 {
        get(&client, proxy, "/", &[]).await;
    }
    let green = (g.hits() - gg) as f64 / ((b.hits() - gb) + (g.hits() - gg)) as f64;
    assert!((green - 0.30).abs() < 0.035, "observed {green}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_persisted_state() {
    let dir = tmpdir("restart");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let text = cp_config(&dir, 5.0, "", &b, &g);
    let (app, _) = start(&text).await;
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

    let (app, proxy) = start(&text).await;
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
    let dir = tmpdir("reload");
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

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failed) = (stop.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(format!("http://{proxy}/"))
                    .body(empty())
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
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

    // Invalid reloads: syntax error, bad value, unreadable file.
    let bad = [
        text.replace("[[service]]", "[[service]"),
        text.replace("candidate_percent = 0", "candidate_percent = 300"),
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
        3.0
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
    assert_eq!(rejected, 3);

    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed across reloads"
    );
    assert!(g2.hits() > 0, "the endpoint added by reload took traffic");
    app.shutdown().await;
}

/// The binary itself: SIGHUP reloads, SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_and_exits_cleanly_on_sigterm() {
    let dir = tmpdir("bin");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let path = dir.join("cyan.toml");
    let text = cp_config(&dir, 0.0, "", &b, &g);
    std::fs::write(&path, &text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cyan"))
        .args(["run", "--config"])
        .arg(&path)
        .env("CYAN_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let sock = dir.join("admin.sock");
    assert!(
        eventually(Duration::from_secs(10), || sock.exists()).await,
        "admin socket appears"
    );
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
    let mut reloaded = false;
    for _ in 0..100 {
        let (_, v) = admin(&dir, Method::GET, "/v1/status", None).await;
        if v["services"][0]["path_prefix"] == "/api" {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP reloaded the config");

    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the socket is removed on exit");
}
