//! Binary upgrade: a new cyan takes the listening sockets over from the
//! running one (fd passing) while clients keep opening new connections;
//! not one is refused or fails, and the live state carries over.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cyan::ctl::{call, Target};
use support::*;

fn spawn(config: &std::path::Path, upgrade: bool) -> tokio::process::Child {
    spawn_with(config, upgrade, Stdio::inherit())
}

fn spawn_with(config: &std::path::Path, upgrade: bool, stderr: Stdio) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cyan"));
    cmd.args(["run", "--config"]).arg(config);
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.env("CYAN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("cyan starts")
}

/// One request on a brand-new connection.
async fn one_request(proxy: std::net::SocketAddr) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if text.starts_with("HTTP/1.1 200") {
        Ok(text)
    } else {
        Err(format!("answer: {}", text.lines().next().unwrap_or("")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_upgrades_refuse_no_connection() {
    let dir = tmpdir("upgrade");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let proxy = dead_addr().await; // a free port, fixed for the config
    let path = dir.join("cyan.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[runtime]
drain_timeout = "5s"
upgrade_socket = "{up}"
[admin]
socket = "{sock}"
[state]
dir = "{state}"
[metrics]
listen = "127.0.0.1:0"
[[listener]]
name = "public"
listen = "{proxy}"
[[service]]
name = "gateway"
candidate_percent = 0
blue  = {{ endpoints = ["{b}"] }}
green = {{ endpoints = ["{g}"] }}
"#,
            up = dir.join("upgrade.sock").display(),
            sock = dir.join("admin.sock").display(),
            state = dir.join("state").display(),
            b = b.addr,
            g = g.addr,
        ),
    )
    .unwrap();
    let admin = Target::Socket(dir.join("admin.sock"));
    let mut current = spawn(&path, false);
    assert!(
        eventually(Duration::from_secs(10), || dir.join("admin.sock").exists()).await,
        "first cyan is up"
    );
    let (s, _) = call(
        &admin,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 30})),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);

    // New-connection churn for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match one_request(proxy).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    for round in 0..3 {
        let before = ok.load(Ordering::SeqCst);
        let mut next = spawn(&path, true);
        let old_exit = tokio::time::timeout(Duration::from_secs(15), current.wait())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the old process did not exit"))
            .unwrap();
        assert!(
            old_exit.success(),
            "round {round}: old process exit {old_exit:?}"
        );
        // The new one serves, with the state the old one had.
        let (s, v) = call(&admin, Method::GET, "/v1/services/gateway", None)
            .await
            .unwrap();
        assert_eq!(
            s, 200,
            "round {round}: the admin socket works after the hand-over"
        );
        assert_eq!(
            v["candidate_percent"], 30.0,
            "round {round}: state carried over"
        );
        assert!(dir.join("admin.sock").exists());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            ok.load(Ordering::SeqCst) > before,
            "round {round}: traffic kept flowing"
        );
        assert!(
            next.try_wait().unwrap().is_none(),
            "round {round}: the new process runs"
        );
        current = std::mem::replace(&mut next, spawn_with(&path, false, Stdio::null()));
        // `next` (a spare started without --upgrade) must fail: the
        // listener's port and the admin socket are taken.
        let spare = tokio::time::timeout(Duration::from_secs(10), next.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !spare.success(),
            "a second cyan may not steal a live admin socket or port"
        );
    }

    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let served = ok.load(Ordering::SeqCst);
    eprintln!(
        "{served} requests on new connections across 3 upgrades, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "{served}");

    let pid = rustix::process::Pid::from_raw(current.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), current.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
