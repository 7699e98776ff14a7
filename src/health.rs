//! Endpoint health: active probes and passive ejection, feeding the table.
//!
//! * **Active**: per endpoint with a configured `path`, one request on a
//!   fresh connection every `interval` (± `jitter`), under `timeout`; the
//!   status must be in `expect` (default 200..=399). `fall` consecutive
//!   failures mark the endpoint down, `rise` successes mark it up.
//! * **Passive**: the request path counts consecutive failures per endpoint
//!   (connect errors, 5xx, timeouts, resets; 4xx never count) in an atomic.
//!   `eject_after` of them eject the endpoint for `eject_for`, doubling on
//!   each repeat up to `eject_max`. After the back-off the endpoint is probed
//!   back in: the next successful active probe — or, without active checks, a
//!   successful TCP connect — re-admits it.
//!
//! Only transitions reach the table (`SetHealth`, origin `health`, audited),
//! never individual probes. The state machine ([`EndpointHealth`]) is pure;
//! the supervisor task feeds it probe results and counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ActiveCheck, Color, HealthConfig};
use crate::table::{Change, Command, Origin, Table};

/// One endpoint's health, as a pure state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointHealth {
    /// The active checks' verdict (true until `fall` failures).
    pub active_up: bool,
    successes: u32,
    failures: u32,
    /// Passive ejection in force until then.
    pub ejected_until: Option<Instant>,
    /// Ejections so far (the back-off grows with them).
    pub ejections: u32,
    /// Healthy since (to forget old ejections).
    up_since: Instant,
    /// A re-admission connect is under way.
    pub readmit_pending: bool,
}

/// A change of an endpoint's usability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub healthy: bool,
    pub reason: String,
}

impl EndpointHealth {
    pub fn new(now: Instant) -> EndpointHealth {
        EndpointHealth {
            active_up: true,
            successes: 0,
            failures: 0,
            ejected_until: None,
            ejections: 0,
            up_since: now,
            readmit_pending: false,
        }
    }

    /// Whether the endpoint may take traffic.
    pub fn healthy(&self) -> bool {
        self.active_up && self.ejected_until.is_none()
    }

    /// Feeds an active probe's result.
    pub fn on_probe(&mut self, ok: bool, check: &ActiveCheck, now: Instant) -> Option<Transition> {
        let before = self.healthy();
        if ok {
            self.failures = 0;
            self.successes += 1;
            if !self.active_up && self.successes >= check.rise {
                self.active_up = true;
            }
            // A successful probe after the back-off re-admits an ejected endpoint.
            if self.ejected_until.is_some_and(|t| now >= t) {
                self.ejected_until = None;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.active_up && self.failures >= check.fall {
                self.active_up = false;
            }
        }
        self.transition(before, now, || {
            if ok {
                format!("active: {} successful probes", check.rise)
            } else {
                format!("active: {} failed probes", check.fall)
            }
        })
    }

    /// Feeds the passive consecutive-failure count.
    pub fn on_passive(
        &mut self,
        consecutive: u32,
        cfg: &HealthConfig,
        now: Instant,
    ) -> Option<Transition> {
        if cfg.eject_after == 0 || consecutive < cfg.eject_after || self.ejected_until.is_some() {
            return None;
        }
        let before = self.healthy();
        // Forget old ejections once healthy for a full `eject_max`.
        if now.duration_since(self.up_since) > cfg.eject_max {
            self.ejections = 0;
        }
        let factor = 1u32.checked_shl(self.ejections).unwrap_or(u32::MAX);
        let backoff = cfg.eject_for.saturating_mul(factor).min(cfg.eject_max);
        self.ejections += 1;
        self.ejected_until = Some(now + backoff);
        self.transition(before, now, || {
            format!(
                "passive: {consecutive} consecutive failures, ejected for {}s",
                backoff.as_secs_f64()
            )
        })
    }

    /// After the back-off, without active checks: a connect result.
    pub fn on_readmit_probe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        self.readmit_pending = false;
        let before = self.healthy();
        if ok && self.ejected_until.is_some_and(|t| now >= t) {
            self.ejected_until = None;
        }
        self.transition(before, now, || {
            "passive: back-off over, endpoint answers again".into()
        })
    }

    fn transition(
        &mut self,
        before: bool,
        now: Instant,
        why: impl FnOnce() -> String,
    ) -> Option<Transition> {
        let after = self.healthy();
        if before == after {
            return None;
        }
        if after {
            self.up_since = now;
        }
        Some(Transition {
            healthy: after,
            reason: why(),
        })
    }

    /// Whether the back-off is over and the endpoint waits to be probed back.
    pub fn awaiting_readmit(&self, now: Instant) -> bool {
        !self.readmit_pending && self.ejected_until.is_some_and(|t| now >= t)
    }
}

/// Sends one probe on a fresh connection; `Ok(status)` or why it failed.
pub async fn probe(addr: SocketAddr, check: &ActiveCheck) -> Result<u16, String> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let host = check.host.clone().unwrap_or_else(|| addr.to_string());
        let req = Request::builder()
            .method(check.method.clone())
            .uri(&check.path)
            .header(http::header::HOST, host)
            .header(
                http::header::USER_AGENT,
                concat!("cyan-health/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(resp.status().as_u16())
    };
    match tokio::time::timeout(check.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

/// Whether a probe's status counts as healthy.
pub fn status_ok(check: &ActiveCheck, status: u16) -> bool {
    if check.expect.is_empty() {
        (200..400).contains(&status)
    } else {
        check.expect.contains(&status)
    }
}

type Key = (Arc<str>, Color, SocketAddr);

struct ProbeResult {
    key: Key,
    ok: bool,
    detail: String,
    /// A re-admission connect rather than an active probe.
    readmit: bool,
}

/// Runs health checking for every endpoint of the live table until `stop`.
pub fn spawn_supervisor(table: Arc<Table>, stop: CancellationToken) {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<ProbeResult>(1024);
        let mut states: HashMap<Key, EndpointHealth> = HashMap::new();
        // One probe loop per endpoint with active checks; keyed with its check
        // so a reload that changes the check restarts it.
        let mut probes: HashMap<Key, (ActiveCheck, CancellationToken)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(r) = rx.recv() => on_probe_result(&table, &mut states, r),
                _ = tick.tick() => reconcile(&table, &mut states, &mut probes, &tx, &stop),
            }
        }
        for (_, (_, t)) in probes {
            t.cancel();
        }
    });
}

fn on_probe_result(table: &Table, states: &mut HashMap<Key, EndpointHealth>, r: ProbeResult) {
    let t = table.load();
    let Some(svc) = t.service(&r.key.0) else {
        return;
    };
    let now = Instant::now();
    if r.readmit {
        if let Some(state) = states.get_mut(&r.key) {
            if let Some(tr) = state.on_readmit_probe(r.ok, now) {
                set_health(table, &r.key, tr.healthy, tr.reason);
            }
        }
        return;
    }
    let cfg = &svc.config.pool(r.key.1).health;
    let Some(check) = &cfg.active else { return };
    let metrics = table.metrics();
    metrics
        .health_checks
        .with_label_values(&[
            &*r.key.0,
            r.key.1.as_str(),
            &r.key.2.to_string(),
            if r.ok { "success" } else { "failure" },
        ])
        .inc();
    let state = states
        .entry(r.key.clone())
        .or_insert_with(|| EndpointHealth::new(now));
    if let Some(tr) = state.on_probe(r.ok, check, now) {
        let reason = if r.ok {
            tr.reason
        } else {
            format!("{} (last: {})", tr.reason, r.detail)
        };
        set_health(table, &r.key, tr.healthy, reason);
    }
}

fn set_health(table: &Table, key: &Key, healthy: bool, reason: String) {
    tracing::warn!(service = %key.0, color = %key.1, endpoint = %key.2, healthy, reason = %reason, "endpoint health changed");
    let cmd = Command::SetHealth {
        service: key.0.to_string(),
        color: key.1,
        addr: key.2,
        healthy,
    };
    let _ = table.apply(Change::new(cmd, Origin::Health, "health").reason(Some(reason)));
}

fn reconcile(
    table: &Arc<Table>,
    states: &mut HashMap<Key, EndpointHealth>,
    probes: &mut HashMap<Key, (ActiveCheck, CancellationToken)>,
    tx: &mpsc::Sender<ProbeResult>,
    stop: &CancellationToken,
) {
    let t = table.load();
    let now = Instant::now();
    let mut live: Vec<Key> = Vec::new();
    for svc in &t.services {
        for color in [Color::Blue, Color::Green] {
            let cfg = &svc.config.pool(color).health;
            for e in &svc.pool(color).endpoints {
                let key: Key = (svc.name.clone(), color, e.addr);
                live.push(key.clone());
                let state = states
                    .entry(key.clone())
                    .or_insert_with(|| EndpointHealth::new(now));
                // Passive: the request path's consecutive failure count.
                let consecutive = e.upstream.consecutive_failures();
                if let Some(tr) = state.on_passive(consecutive, cfg, now) {
                    e.upstream.reset_failures();
                    set_health(table, &key, tr.healthy, tr.reason);
                }
                if cfg.active.is_none() && state.awaiting_readmit(now) {
                    // Without active checks a connect decides; at most one
                    // attempt per tick, bounded by the connect timeout.
                    let (tx, key2, addr) = (tx.clone(), key.clone(), e.addr);
                    let limit = e.upstream.settings.connect_timeout;
                    state.readmit_pending = true;
                    tokio::spawn(async move {
                        let ok = matches!(
                            tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await,
                            Ok(Ok(_))
                        );
                        let _ = tx
                            .send(ProbeResult {
                                key: key2,
                                ok,
                                detail: "re-admission connect".into(),
                                readmit: true,
                            })
                            .await;
                    });
                }
                // Keep exactly one probe loop per endpoint with active checks.
                match (&cfg.active, probes.get(&key)) {
                    (Some(check), Some((running, _))) if running == check => {}
                    (Some(check), _) => {
                        if let Some((_, old)) = probes.remove(&key) {
                            old.cancel();
                        }
                        let token = stop.child_token();
                        spawn_probe_loop(key.clone(), check.clone(), tx.clone(), token.clone());
                        probes.insert(key.clone(), (check.clone(), token));
                    }
                    (None, Some(_)) => {
                        if let Some((_, old)) = probes.remove(&key) {
                            old.cancel();
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }
    probes.retain(|k, (_, token)| {
        let keep = live.contains(k);
        if !keep {
            token.cancel();
        }
        keep
    });
    states.retain(|k, _| live.contains(k));
}

fn spawn_probe_loop(
    key: Key,
    check: ActiveCheck,
    tx: mpsc::Sender<ProbeResult>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let jitter = 1.0 + check.jitter * (fastrand::f64() * 2.0 - 1.0);
            let wait = check.interval.mul_f64(jitter);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            let (ok, detail) = match probe(key.2, &check).await {
                Ok(status) => (status_ok(&check, status), format!("status {status}")),
                Err(e) => (false, e),
            };
            let result = ProbeResult {
                key: key.clone(),
                ok,
                detail,
                readmit: false,
            };
            if tx.send(result).await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> ActiveCheck {
        ActiveCheck {
            method: http::Method::GET,
            path: "/status".into(),
            host: None,
            expect: vec![],
            interval: Duration::from_secs(1),
            jitter: 0.0,
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    fn cfg() -> HealthConfig {
        HealthConfig {
            active: Some(check()),
            eject_after: 5,
            eject_for: Duration::from_secs(10),
            eject_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn rise_and_fall() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::new(t0);
        let c = check();
        assert_eq!(h.on_probe(false, &c, t0), None);
        assert_eq!(h.on_probe(false, &c, t0), None);
        let down = h.on_probe(false, &c, t0).unwrap();
        assert!(!down.healthy);
        assert_eq!(h.on_probe(false, &c, t0), None, "transitions only");
        assert_eq!(h.on_probe(true, &c, t0), None);
        assert!(h.on_probe(true, &c, t0).unwrap().healthy);
        // A failure between successes resets the count.
        let mut h = EndpointHealth::new(t0);
        h.on_probe(false, &c, t0);
        h.on_probe(false, &c, t0);
        h.on_probe(true, &c, t0);
        assert_eq!(h.on_probe(false, &c, t0), None);
        assert!(h.healthy());
    }

    #[test]
    fn passive_ejection_backs_off_and_is_probed_back() {
        let t0 = Instant::now();
        let (c, hc) = (check(), cfg());
        let mut h = EndpointHealth::new(t0);
        assert_eq!(h.on_passive(4, &hc, t0), None);
        let tr = h.on_passive(5, &hc, t0).unwrap();
        assert!(!tr.healthy);
        assert_eq!(h.ejected_until, Some(t0 + Duration::from_secs(10)));
        // A probe during the back-off does not re-admit.
        assert_eq!(h.on_probe(true, &c, t0 + Duration::from_secs(5)), None);
        assert!(
            h.on_probe(true, &c, t0 + Duration::from_secs(10))
                .unwrap()
                .healthy
        );
        // The next ejection lasts twice as long, capped at eject_max.
        let t1 = t0 + Duration::from_secs(11);
        h.on_passive(5, &hc, t1);
        assert_eq!(h.ejected_until, Some(t1 + Duration::from_secs(20)));
        h.on_probe(true, &c, t1 + Duration::from_secs(20));
        let t2 = t1 + Duration::from_secs(21);
        h.on_passive(9, &hc, t2);
        assert_eq!(h.ejected_until, Some(t2 + Duration::from_secs(40)));
        h.on_probe(true, &c, t2 + Duration::from_secs(40));
        let t3 = t2 + Duration::from_secs(41);
        h.on_passive(9, &hc, t3);
        assert_eq!(
            h.ejected_until,
            Some(t3 + Duration::from_secs(60)),
            "capped"
        );
        // Healthy for longer than eject_max: the back-off starts over.
        h.on_probe(true, &c, t3 + Duration::from_secs(60));
        let t4 = t3 + Duration::from_secs(200);
        h.on_passive(5, &hc, t4);
        assert_eq!(h.ejected_until, Some(t4 + Duration::from_secs(10)));
    }

    #[test]
    fn readmit_without_active_checks() {
        let t0 = Instant::now();
        let mut hc = cfg();
        hc.active = None;
        let mut h = EndpointHealth::new(t0);
        h.on_passive(5, &hc, t0);
        assert!(!h.awaiting_readmit(t0));
        let later = t0 + Duration::from_secs(10);
        assert!(h.awaiting_readmit(later));
        assert_eq!(h.on_readmit_probe(false, later), None);
        assert!(h.on_readmit_probe(true, later).unwrap().healthy);
    }

    #[test]
    fn expected_statuses() {
        let mut c = check();
        assert!(
            status_ok(&c, 204) && status_ok(&c, 302) && !status_ok(&c, 404) && !status_ok(&c, 503)
        );
        c.expect = vec![200];
        assert!(!status_ok(&c, 204));
    }
}
