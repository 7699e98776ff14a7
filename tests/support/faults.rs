//! Helpers for the fault tests (`tests/faults.rs`): the fault-test backend
//! (`cyan::demo::TestBackend`) in process or in a child process that can be
//! SIGKILLed by its PID, a load whose every request carries a unique id and
//! is verified end to end, a backend that accepts and never answers, and the
//! process's open descriptor count.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::{digest_hex, empty, full, h1_client, DIGEST};

/// Open descriptors of this process (the proxy, the in-process backends and
/// the clients all live here).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open sockets of this process (descriptors linking to `socket:[inode]`).
/// The connection leaks the fault tests look for are sockets; counting
/// only them keeps the count steady while the test harness starts the
/// next test's runtime (its epoll and event descriptors) alongside.
pub fn open_sockets() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Samples [`open_sockets`] every 5 ms on a plain thread; `finish` gives
/// the highest count seen.
pub struct FdPeak {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl FdPeak {
    pub fn start() -> FdPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = open_sockets();
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(open_sockets());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak.max(open_sockets())
        });
        FdPeak { stop, thread }
    }

    pub fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(usize::MAX)
    }
}

/// What a backend reported: `recv <id>` / `done <id>` lines, in order.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }

    fn events(&self, what: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(what)?.strip_prefix(' '))
            .map(str::to_string)
            .collect()
    }

    /// How many times each id arrived.
    pub fn received(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for id in self.events("recv") {
            *m.entry(id).or_insert(0) += 1;
        }
        m
    }

    /// Ids that arrived and were never answered.
    pub fn unanswered(&self) -> HashSet<String> {
        let done: HashSet<String> = self.events("done").into_iter().collect();
        self.events("recv")
            .into_iter()
            .filter(|id| !done.contains(id))
            .collect()
    }
}

/// The fault-test backend in this process, recording the ids it sees.
pub struct LocalBackend {
    pub addr: SocketAddr,
    pub seen: Seen,
    stop: CancellationToken,
}

impl LocalBackend {
    pub async fn start(color: &str, delay: Duration) -> LocalBackend {
        let seen = Seen::default();
        let hook = seen.clone();
        let stop = CancellationToken::new();
        let addr = cyan::demo::TestBackend {
            color: color.into(),
            delay,
            seen: Some(Arc::new(move |line: &str| hook.push(line))),
        }
        .start(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .expect("start the in-process test backend");
        LocalBackend { addr, seen, stop }
    }
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `cyan test-backend` in a child process: killed on drop, and it exits by
/// itself when this process goes away (it watches its stdin).
pub struct ChildBackend {
    pub addr: SocketAddr,
    pub pid: u32,
    pub seen: Seen,
    child: tokio::process::Child,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ChildBackend {
    pub async fn spawn(color: &str, delay_ms: u64) -> ChildBackend {
        let mut child = tokio::process::Command::new(crate::support::cyan_exe())
            .args(["test-backend", "--color", color, "--listen", "127.0.0.1:0"])
            .args(["--delay-ms", &delay_ms.to_string()])
            .env("CYAN_LOG", "error")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cyan test-backend");
        let pid = child.id().expect("child pid");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the child backend starts within 10 s")
            .expect("read the child's stdout")
            .expect("the child prints its address");
        let addr: SocketAddr = first
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the child: {first:?}"));
        let seen = Seen::default();
        let sink = seen.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.push(&line);
            }
        });
        ChildBackend {
            addr,
            pid,
            seen,
            child,
            reader: Some(reader),
        }
    }

    /// SIGKILL by PID (no chance to close anything gracefully), then reap it
    /// and read what it reported up to its death.
    pub async fn kill(&mut self) {
        use rustix::process::{kill_process, Pid, Signal};
        let pid = Pid::from_raw(self.pid as i32).expect("a valid pid");
        kill_process(pid, Signal::KILL).expect("SIGKILL the child backend");
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .expect("the killed child is reaped within 5 s")
            .expect("wait for the child");
        assert!(!status.success(), "killed, not exited: {status:?}");
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
    }
}

/// How one request of a [`FaultLoad`] ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with the whole, verified body.
    Ok,
    /// Another status, with its body.
    Status(u16, String),
    /// A response head, then the body broke off.
    Aborted(u16),
    /// No response head: the exchange failed before one arrived.
    NoHead(String),
    /// No complete answer within the client's timeout: a hang.
    Timeout,
    /// A 200 whose body is complete but wrong (truncated or corrupted
    /// while looking whole).
    Corrupt(String),
}

/// One request of a [`FaultLoad`].
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub post: bool,
    pub outcome: Outcome,
    pub started: Instant,
    pub ended: Instant,
}

/// What a [`FaultLoad`] sends.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Every `post_every`-th request is a POST /upload (1: all of them,
    /// 0: none); the others GET /blob.
    pub post_every: u64,
    /// POST bodies are 1..=`post_max` bytes.
    pub post_max: usize,
    /// GET /blob/<blob>?pause=<pause_ms>.
    pub blob: usize,
    pub pause_ms: u64,
    /// Client-side limit on a whole exchange; past it the request is a hang.
    pub timeout: Duration,
}

/// Workers sending requests with unique ids (`x-test-id`) and checking every
/// answer end to end, until stopped.
pub struct FaultLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Record>>>,
}

impl FaultLoad {
    pub fn start(proxy: SocketAddr, tag: &str, workers: usize, mix: Mix) -> FaultLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let blob = Arc::new(cyan::demo::blob(mix.blob));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (stop, sent, blob) = (stop.clone(), sent.clone(), blob.clone());
            let tag = tag.to_string();
            tasks.push(tokio::spawn(async move {
                let client = h1_client();
                let mut out = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    let id = format!("{tag}-{w}-{seq}");
                    let post = mix.post_every != 0 && seq % mix.post_every == 0;
                    let started = Instant::now();
                    sent.fetch_add(1, Ordering::SeqCst);
                    let exchange = one(&client, proxy, &id, post, &mix, &blob);
                    let outcome = match tokio::time::timeout(mix.timeout, exchange).await {
                        Ok(o) => o,
                        Err(_) => Outcome::Timeout,
                    };
                    out.push(Record {
                        id,
                        post,
                        outcome,
                        started,
                        ended: Instant::now(),
                    });
                }
                out
            }));
        }
        FaultLoad { stop, sent, tasks }
    }

    /// Requests started so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    pub async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("load worker"));
        }
        all
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    super::BoxBody,
>;

async fn one(
    client: &Client,
    proxy: SocketAddr,
    id: &str,
    post: bool,
    mix: &Mix,
    blob: &[u8],
) -> Outcome {
    let (req, expected) = if post {
        // A body of its own per request, so a mix-up between requests shows.
        let mut rng = fastrand::Rng::with_seed(xxhash_rust::xxh3::xxh3_64(id.as_bytes()));
        let len = rng.usize(1..=mix.post_max.max(1));
        let body: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let digest = digest_hex(&body);
        let expected = format!("{digest} {len}");
        let req = http::Request::post(format!("http://{proxy}/upload"))
            .header("x-test-id", id)
            .header(DIGEST, digest)
            .body(full(body))
            .unwrap();
        (req, Some(expected))
    } else {
        let req = http::Request::get(format!(
            "http://{proxy}/blob/{}?pause={}",
            mix.blob, mix.pause_ms
        ))
        .header("x-test-id", id)
        .body(empty())
        .unwrap();
        (req, None)
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::NoHead(format!("{e:?}")),
    };
    let status = resp.status().as_u16();
    let header_digest = resp
        .headers()
        .get(DIGEST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Outcome::Aborted(status),
    };
    if status != 200 {
        return Outcome::Status(status, String::from_utf8_lossy(&body).into_owned());
    }
    match expected {
        Some(text) if body != text.as_bytes() => Outcome::Corrupt(format!(
            "upload answer {:?}, expected {text:?}",
            String::from_utf8_lossy(&body)
        )),
        Some(_) => Outcome::Ok,
        None if body[..] != blob[..] => Outcome::Corrupt(format!(
            "blob of {} bytes, expected {}",
            body.len(),
            blob.len()
        )),
        None if header_digest.as_deref() != Some(digest_hex(&body).as_str()) => {
            Outcome::Corrupt(format!("blob digest header {header_digest:?}"))
        }
        None => Outcome::Ok,
    }
}

/// A backend that accepts connections and never answers: it reads and
/// discards until the peer closes, then closes too.
pub struct Blackhole {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections currently open on its side.
    pub open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (a, o, s) = (accepted.clone(), open.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut sock = tokio::select! {
                    r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (o, s) = (o.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        tokio::select! {
                            r = sock.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            },
                            _ = s.cancelled() => break,
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Blackhole {
            addr,
            accepted,
            open,
            stop,
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn list(a: &[SocketAddr]) -> String {
    a.iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts endpoint addresses into a config made with empty pools (e.g.
/// [`super::app_config`] with `&[]`): blue's pool comes first, then green's.
pub fn with_endpoints(text: &str, blue: &[SocketAddr], green: &[SocketAddr]) -> String {
    text.replacen(
        "endpoints = []",
        &format!("endpoints = [{}]", list(blue)),
        1,
    )
    .replacen(
        "endpoints = []",
        &format!("endpoints = [{}]", list(green)),
        1,
    )
}

/// Fills a `{blue}` / `{green}` template (e.g. [`super::service_config`])
/// with addresses.
pub fn with_addrs(
    template: &str,
    blue: &[SocketAddr],
    green: &[SocketAddr],
) -> cyan::config::Config {
    let text = template
        .replace("{blue}", &list(blue))
        .replace("{green}", &list(green));
    cyan::config::Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// Like [`super::eventually`], for a check that has to await.
pub async fn eventually_async<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
