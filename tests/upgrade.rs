//! Binary upgrade: a new cyan takes the listening sockets over from the
//! running one (fd passing) while clients keep opening new connections;
//! not one is refused or fails, and the live state carries over. Also the
//! systemd template unit's mode, `--upgrade=auto` (start normally when no
//! cyan runs, take over when one does, never fall back after a failed
//! hand-over) and its `Type=notify` messages.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cyan::ctl::{call, Target};
use support::*;

fn spawn(config: &Path, upgrade: bool) -> tokio::process::Child {
    spawn_with(config, upgrade, Stdio::inherit())
}

fn spawn_with(config: &Path, upgrade: bool, stderr: Stdio) -> tokio::process::Child {
    cyan_run(config, upgrade.then_some("--upgrade"), None, stderr)
}

/// `cyan run --config CONFIG [FLAG]`, with `NOTIFY_SOCKET` when given (as
/// systemd sets it for a `Type=notify` unit).
fn cyan_run(
    config: &Path,
    flag: Option<&str>,
    notify: Option<&Path>,
    stderr: Stdio,
) -> tokio::process::Child {
    let env: Vec<_> = notify
        .map(|n| ("NOTIFY_SOCKET", n.as_os_str()))
        .into_iter()
        .collect();
    spawn_cyan_run(config, flag, &env, stderr)
}

/// The config every test here uses: one listener on `proxy`, admin and
/// upgrade sockets and the state in `dir`.
fn write_config(dir: &Path, proxy: SocketAddr, b: SocketAddr, g: SocketAddr) -> PathBuf {
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
        ),
    )
    .unwrap();
    path
}

/// A stand-in for systemd's notification socket.
fn notify_socket(path: &Path) -> tokio::net::UnixDatagram {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixDatagram::bind(path).unwrap()
}

/// The next notification, within `within`.
async fn next_notify(sock: &tokio::net::UnixDatagram, within: Duration) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Clients opening a new connection per request until stopped.
struct Churn {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Churn {
    fn start(proxy: SocketAddr, clients: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
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
        Churn {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    fn served(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the clients; returns (requests served, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

async fn sigterm_and_wait(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
}

/// One request on a brand-new connection.
async fn one_request(proxy: SocketAddr) -> Result<String, String> {
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
    let dir = TempDir::new("upgrade");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let proxy = dead_addr().await; // a free port, fixed for the config
    let path = write_config(&dir, proxy, b.addr, g.addr);
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
    let load = Churn::start(proxy, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = std::fs::read_to_string(&path).unwrap();
    for round in 0..3 {
        let before = load.served();
        // The successors alternate between the one-thread runtime (tokio's
        // current-thread scheduler) and the default (a worker per core):
        // each shape takes the sockets over from the other.
        let shape = if round % 2 == 0 {
            text.replace("[runtime]\n", "[runtime]\nworker_threads = 1\n")
        } else {
            text.clone()
        };
        assert!(round % 2 == 1 || shape.contains("worker_threads = 1"));
        std::fs::write(&path, shape).unwrap();
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
            load.served() > before,
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

    let (served, failures) = load.finish().await;
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

    assert!(sigterm_and_wait(&mut current).await.success());
}

/// The template unit's mode: with no predecessor (and a stale upgrade socket
/// file left by an earlier run) `--upgrade=auto` starts normally and says
/// READY=1; started again beside it, it takes the sockets over without
/// refusing a connection, says READY=1 only then, and the old one says
/// STOPPING=1 and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_auto_starts_alone_or_takes_over() {
    let dir = TempDir::new("upgrade-auto");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let proxy = dead_addr().await;
    let path = write_config(&dir, proxy, b.addr, g.addr);
    let admin = Target::Socket(dir.join("admin.sock"));
    // What a crashed (or cleanly exited) cyan leaves: the socket file with
    // nobody listening.
    drop(std::os::unix::net::UnixListener::bind(dir.join("upgrade.sock")).unwrap());

    // No predecessor: starts and serves.
    let notify_a = notify_socket(&dir.join("notify-a.sock"));
    let mut first = cyan_run(
        &path,
        Some("--upgrade=auto"),
        Some(&dir.join("notify-a.sock")),
        Stdio::inherit(),
    );
    let msg = next_notify(&notify_a, Duration::from_secs(10)).await;
    assert!(msg.starts_with("READY=1\n"), "{msg:?}");
    assert!(!msg.contains("took the sockets over"), "{msg:?}");
    one_request(proxy)
        .await
        .expect("serves once READY=1 is sent");
    let (s, _) = call(
        &admin,
        Method::PUT,
        "/v1/services/gateway/split",
        Some(json!({"candidate_percent": 30})),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);

    // A predecessor: takes over under new-connection churn.
    let load = Churn::start(proxy, 4);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = load.served();
    let notify_b = notify_socket(&dir.join("notify-b.sock"));
    let mut second = cyan_run(
        &path,
        Some("--upgrade=auto"),
        Some(&dir.join("notify-b.sock")),
        Stdio::inherit(),
    );
    let msg = next_notify(&notify_b, Duration::from_secs(10)).await;
    assert!(
        msg.starts_with("READY=1\n") && msg.contains("took the sockets over"),
        "{msg:?}"
    );
    let msg = next_notify(&notify_a, Duration::from_secs(10)).await;
    assert!(
        msg.starts_with("STOPPING=1\n") && msg.contains("handed over"),
        "{msg:?}"
    );
    let old_exit = tokio::time::timeout(Duration::from_secs(10), first.wait())
        .await
        .expect("the old process exits after the hand-over")
        .unwrap();
    assert!(old_exit.success(), "old process exit {old_exit:?}");
    let (s, v) = call(&admin, Method::GET, "/v1/services/gateway", None)
        .await
        .unwrap();
    assert_eq!(s, 200, "the admin socket works after the hand-over");
    assert_eq!(v["candidate_percent"], 30.0, "state carried over");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (served, failures) = load.finish().await;
    eprintln!(
        "{served} requests on new connections across an --upgrade=auto hand-over, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served > before, "traffic kept flowing");
    assert!(second.try_wait().unwrap().is_none(), "the new process runs");

    // A SIGTERM'd instance says STOPPING=1 too, and exits 0.
    assert!(sigterm_and_wait(&mut second).await.success());
    let msg = next_notify(&notify_b, Duration::from_secs(5)).await;
    assert!(msg.starts_with("STOPPING=1\n"), "{msg:?}");
}

/// Something answers on the upgrade socket but the hand-over fails:
/// `--upgrade=auto` must not fall back to a normal start. And `--upgrade`
/// alone still refuses to start when nobody answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_auto_never_falls_back_after_a_failed_hand_over() {
    let dir = TempDir::new("upgrade-auto-fail");
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let proxy = dead_addr().await;
    let path = write_config(&dir, proxy, b.addr, g.addr);

    // A "predecessor" that accepts the request and hangs up.
    let fake = tokio::net::UnixListener::bind(dir.join("upgrade.sock")).unwrap();
    let accepts = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Ok((mut s, _))) =
            tokio::time::timeout(Duration::from_secs(10), fake.accept()).await
        {
            let mut hello = [0u8; 15];
            let _ = s.read_exact(&mut hello).await;
            n += 1;
            drop(s);
            if n == 2 {
                break;
            }
        }
        n
    });
    let notify = notify_socket(&dir.join("notify.sock"));
    let out = cyan_run(
        &path,
        Some("--upgrade=auto"),
        Some(&dir.join("notify.sock")),
        Stdio::piped(),
    )
    .wait_with_output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "no fallback: the port was not bound"
    );
    assert!(
        !dir.join("admin.sock").exists(),
        "no fallback: no admin socket"
    );
    let mut buf = [0u8; 64];
    assert!(
        notify.try_recv(&mut buf).is_err(),
        "no READY=1 after a failed hand-over"
    );

    // `--upgrade` is as strict.
    let out = cyan_run(&path, Some("--upgrade"), None, Stdio::piped())
        .wait_with_output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert_eq!(accepts.await.unwrap(), 2, "both asked the fake predecessor");

    // Nobody listens any more (a stale file): `--upgrade` still refuses,
    // nothing changed.
    let out = cyan_run(&path, Some("--upgrade"), None, Stdio::piped())
        .wait_with_output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upgrade failed, nothing changed") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
}
