//! Accept errors (EMFILE) must not end the server or spin the CPU: the
//! accept loop backs off and resumes once descriptors are free again.
//!
//! A test binary of its own: it lowers the process's descriptor limit, which
//! would disturb any other test running in the same process.

mod support;

use std::time::{Duration, Instant};

use rustix::process::{getrlimit, setrlimit, Resource};
use support::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// CPU time (user + system) this process has used, read through an already
/// open `/proc/self/stat` (no descriptor is free when it matters).
fn cpu_time(stat_file: &std::fs::File) -> Duration {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let n = stat_file.read_at(&mut buf, 0).unwrap();
    let stat = String::from_utf8_lossy(&buf[..n]).into_owned();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ = 100 on Linux
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_backs_off_and_recovers() {
    let (b, g) = (Backend::start("blue").await, Backend::start("green").await);
    let cfg = config(&service_config(0.0, ""), &[&b], &[&g]);
    let (server, proxy) = start_proxy(&cfg).await;
    let client = h1_client();
    assert_eq!(get(&client, proxy, "/", &[]).await.0, 200);
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Client sockets are created before the limit drops: connecting them
    // later needs no new descriptor on our side, but every accept does.
    let sockets: Vec<socket2::Socket> = (0..60)
        .map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap())
        .collect();
    let stat_file = std::fs::File::open("/proc/self/stat").unwrap();
    let base = open_fds();
    let original = getrlimit(Resource::Nofile);
    let mut low = original;
    low.current = Some(base as u64 + 20);
    setrlimit(Resource::Nofile, low).unwrap();

    let mut connected = Vec::new();
    for s in sockets {
        s.connect(&proxy.into()).unwrap(); // completes in the kernel's backlog
        connected.push(s);
    }
    // The proxy accepts about 20 of them, then accept(2) fails with EMFILE.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = metric(&server, "cyan_connections_open", &["listener=\"public\""]);
    assert!(
        (1.0..55.0).contains(&open),
        "descriptors ran out: only {open} of 60 connections accepted"
    );
    let cpu_before = cpu_time(&stat_file);
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let busy = cpu_time(&stat_file).saturating_sub(cpu_before);
    let elapsed = wall.elapsed();
    eprintln!("CPU while descriptors were exhausted: {busy:?} over {elapsed:?}");
    assert!(
        busy < elapsed / 4,
        "the accept loop must back off, not spin: {busy:?} CPU in {elapsed:?}"
    );

    // Free descriptors: close the clients, restore the limit; the proxy
    // serves again.
    drop(connected);
    setrlimit(Resource::Nofile, original).unwrap();
    let client = h1_client();
    let mut ok = false;
    for _ in 0..50 {
        let req = http::Request::get(format!("http://{proxy}/"))
            .body(empty())
            .unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
            if r.status() == 200 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the proxy serves again once descriptors are free");
    server.shutdown().await;
}
