//! Automatic rollback and progressive rollouts: pure decisions about
//! observations and time, inside one thin driver task.
//!
//! ## Rollback triggers (each judged per evaluation, `consecutive` in a row)
//! 1. **candidate unhealthy**: fewer than `min_healthy_fraction` of the
//!    candidate pool's endpoints are up (needs no traffic).
//! 2. **failure ratio**: the candidate's Wilson lower bound (95 %) on its
//!    failure ratio exceeds `max_failure_ratio`.
//! 3. **relative failures**: the candidate's lower bound exceeds the stable
//!    color's upper bound by more than `relative_margin` (both with at least
//!    `min_requests`).
//! 4. **latency**: candidate p99 > `latency_factor` × stable p99 and above
//!    `latency_floor`.
//!
//! With fewer than `min_requests` candidate requests in the window the
//! verdict is *inconclusive: hold* — never a promotion, never a rollback
//! (except trigger 1). On a trigger the candidate's share drops to 0 (or to
//! the next of `step_down`), the service is latched `rolled_back` with the
//! reason and numbers, and it stays so until an operator acts. Before moving
//! traffic back the stable pool must have an eligible endpoint and must not
//! be failing itself; if both colors are bad cyan holds, logs an error and
//! audits it.
//!
//! ## Rollouts
//! A step advances when its hold time has passed (pauses excluded) with no
//! bad sign, the analysis is healthy and the candidate saw at least
//! `min_requests` requests since the step began (within the window). The
//! last step (100 %) promotes. Rollout state lives in the table, so it is
//! persisted and a restart continues the step with its timer.
//!
//! A bad sign — a bad verdict (even one short of `consecutive`), or a
//! candidate endpoint that health checks mark down — restarts the hold from
//! that moment: a step is held *clean* before it advances. Without this a
//! candidate whose health flaps faster than `consecutive` evaluations
//! could advance on whichever evaluation found it up. Health is watched on
//! every driver tick (50 ms), not only at evaluations. The last bad sign is
//! the driver's memory, not persisted: after a restart the hold counts from
//! the step's start, as the table records it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{Color, RollbackConfig, RolloutConfig};
use crate::stats::{wilson, Summary};
use crate::table::{Change, Command, Origin, RolloutState, Service, Table};

/// z for the 95 % Wilson interval.
const Z: f64 = 1.96;

/// What the analysis sees of one service at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub candidate: Summary,
    pub stable: Summary,
    /// Fraction of each pool's endpoints that are eligible.
    pub candidate_up: f64,
    pub stable_up: f64,
}

/// The trigger that tripped, with its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// Metric label: `candidate_unhealthy`, `failure_ratio`,
    /// `relative_failures`, `latency`.
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    Inconclusive,
    Bad(Trigger),
}

/// Judges the candidate against the stable color.
pub fn evaluate(cfg: &RollbackConfig, o: &Observation) -> Verdict {
    if o.candidate_up < cfg.min_healthy_fraction {
        return Verdict::Bad(Trigger {
            kind: "candidate_unhealthy",
            detail: format!(
                "{:.0}% of candidate endpoints up (minimum {:.0}%)",
                o.candidate_up * 100.0,
                cfg.min_healthy_fraction * 100.0
            ),
        });
    }
    let c = &o.candidate;
    if c.requests < cfg.min_requests {
        return Verdict::Inconclusive;
    }
    let (c_lo, _) = wilson(c.failures, c.requests, Z);
    if c_lo > cfg.max_failure_ratio {
        return Verdict::Bad(Trigger {
            kind: "failure_ratio",
            detail: format!(
                "candidate failed {}/{} ({:.1}%, lower bound {:.1}%) above {:.1}%",
                c.failures,
                c.requests,
                c.failure_ratio() * 100.0,
                c_lo * 100.0,
                cfg.max_failure_ratio * 100.0
            ),
        });
    }
    let s = &o.stable;
    if s.requests >= cfg.min_requests {
        let (_, s_hi) = wilson(s.failures, s.requests, Z);
        if c_lo > s_hi + cfg.relative_margin {
            return Verdict::Bad(Trigger {
                kind: "relative_failures",
                detail: format!(
                    "candidate failed {}/{} ({:.1}%) vs stable {}/{} ({:.1}%): lower bound {:.1}% > upper bound {:.1}% + margin {:.1}%",
                    c.failures,
                    c.requests,
                    c.failure_ratio() * 100.0,
                    s.failures,
                    s.requests,
                    s.failure_ratio() * 100.0,
                    c_lo * 100.0,
                    s_hi * 100.0,
                    cfg.relative_margin * 100.0
                ),
            });
        }
        if cfg.latency_factor > 0.0 {
            if let (Some(cp), Some(sp)) = (c.p99, s.p99) {
                if cp > cfg.latency_floor
                    && cp.as_secs_f64() > cfg.latency_factor * sp.as_secs_f64()
                {
                    return Verdict::Bad(Trigger {
                        kind: "latency",
                        detail: format!(
                            "candidate p99 {:.0} ms > {:.1} × stable p99 {:.0} ms (floor {:.0} ms)",
                            cp.as_secs_f64() * 1000.0,
                            cfg.latency_factor,
                            sp.as_secs_f64() * 1000.0,
                            cfg.latency_floor.as_secs_f64() * 1000.0
                        ),
                    });
                }
            }
        }
    }
    Verdict::Healthy
}

/// What to do after an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold,
    Rollback(Trigger),
    /// The candidate is bad but so is the stable color: traffic stays.
    BothBad(Trigger),
}

/// Counts consecutive bad verdicts for one service.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    pub consecutive_bad: u32,
}

impl Tracker {
    pub fn decide(&mut self, cfg: &RollbackConfig, verdict: &Verdict, o: &Observation) -> Decision {
        let Verdict::Bad(trigger) = verdict else {
            self.consecutive_bad = 0;
            return Decision::Hold;
        };
        self.consecutive_bad += 1;
        if self.consecutive_bad < cfg.consecutive {
            return Decision::Hold;
        }
        let stable_failing = o.stable.requests >= cfg.min_requests
            && wilson(o.stable.failures, o.stable.requests, Z).0 > cfg.max_failure_ratio;
        if o.stable_up == 0.0 || stable_failing {
            return Decision::BothBad(trigger.clone());
        }
        Decision::Rollback(trigger.clone())
    }
}

/// The share to move to on a rollback from `current`.
pub fn rollback_target(cfg: &RollbackConfig, current: u16) -> u16 {
    cfg.step_down
        .iter()
        .copied()
        .find(|&s| s < current)
        .unwrap_or(0)
}

/// How long the live step has held clean at `now_ms`: since it began
/// (pauses excluded) or since `last_bad_ms`, the last bad sign, if that was
/// later.
pub fn clean_ms(r: &RolloutState, now_ms: u64, last_bad_ms: Option<u64>) -> u64 {
    let held = r.held_ms(now_ms);
    let end = r.paused_at_ms.unwrap_or(now_ms);
    match last_bad_ms {
        Some(at) if at >= r.step_started_ms => held.min(end.saturating_sub(at)),
        _ => held,
    }
}

/// The next rollout step, if the live one may advance now; `last_bad_ms`
/// is when the last bad sign was seen (see the module doc).
pub fn next_step(
    r: &RolloutState,
    cfg: &RolloutConfig,
    now_ms: u64,
    last_bad_ms: Option<u64>,
    verdict: &Verdict,
    since_step: &Summary,
) -> Option<usize> {
    if r.paused_at_ms.is_some() {
        return None;
    }
    if clean_ms(r, now_ms, last_bad_ms) < cfg.hold.as_millis() as u64 {
        return None;
    }
    if *verdict != Verdict::Healthy || since_step.requests < cfg.min_requests {
        return None;
    }
    (r.step + 1 < r.steps.len()).then_some(r.step + 1)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn up_fraction(s: &Service, c: Color) -> f64 {
    let p = s.pool(c);
    if p.endpoints.is_empty() {
        0.0
    } else {
        p.eligible.len() as f64 / p.endpoints.len() as f64
    }
}

/// The observation of a service now; `since` limits the candidate's summary
/// to a rollout step.
pub fn observe(s: &Service, now: Instant, since: Option<Instant>) -> Observation {
    let cand = s.split.candidate();
    Observation {
        candidate: s.pool(cand).metrics.window.summary(now, since),
        stable: s.pool(s.split.stable).metrics.window.summary(now, None),
        candidate_up: up_fraction(s, cand),
        stable_up: up_fraction(s, s.split.stable),
    }
}

/// Runs the analysis and rollouts of every service until `stop`.
pub fn spawn_driver(table: Arc<Table>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut trackers: HashMap<Arc<str>, DriverState> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let t = table.load();
            let now = Instant::now();
            let now_ms = unix_ms();
            for svc in &t.services {
                let cfg = &svc.config.rollback;
                let entry = trackers
                    .entry(svc.name.clone())
                    .or_insert_with(|| DriverState {
                        tracker: Tracker::default(),
                        last_eval: now,
                        both_bad_logged: false,
                        hold_noted: None,
                        candidate_down: 0,
                        last_bad: None,
                    });
                entry.watch_health(svc, now_ms);
                if now.duration_since(entry.last_eval) < cfg.evaluate_every {
                    continue;
                }
                entry.last_eval = now;
                drive_service(&table, svc, cfg, now, now_ms, entry);
            }
        }
    });
}

/// The driver's memory of one service between evaluations.
#[derive(Debug)]
struct DriverState {
    tracker: Tracker,
    last_eval: Instant,
    both_bad_logged: bool,
    /// The rollout step (and its start) whose overdue hold was audited.
    hold_noted: Option<(usize, u64)>,
    /// Candidate endpoints marked down by health checks at the last tick.
    candidate_down: usize,
    /// The last bad sign during a rollout: when (Unix ms) and what it was.
    last_bad: Option<(u64, String)>,
}

impl DriverState {
    /// Notes a candidate endpoint going down during a rollout (every tick).
    fn watch_health(&mut self, svc: &Service, now_ms: u64) {
        let down = svc
            .pool(svc.split.candidate())
            .endpoints
            .iter()
            .filter(|e| !e.healthy)
            .count();
        if down > self.candidate_down && svc.rollout.is_some() {
            self.last_bad = Some((now_ms, "a candidate endpoint went down".to_string()));
        }
        self.candidate_down = down;
    }
}

fn drive_service(
    table: &Table,
    svc: &Service,
    cfg: &RollbackConfig,
    now: Instant,
    now_ms: u64,
    st: &mut DriverState,
) {
    let DriverState {
        tracker,
        both_bad_logged,
        hold_noted,
        last_bad,
        ..
    } = st;
    let name = svc.name.to_string();
    let bp = svc.split.candidate_bp;
    // A latched service steps further down until it reaches 0.
    if let Some(latch) = &svc.rolled_back {
        if bp > 0 {
            let to = rollback_target(cfg, bp);
            let cmd = Command::AutoRollback {
                service: name,
                to_bp: to,
                reason: latch.reason.clone(),
                at_ms: now_ms,
            };
            let _ = table.apply(Change::new(cmd, Origin::Rollback, "rollback"));
        }
        tracker.consecutive_bad = 0;
        return;
    }
    // The step's own traffic decides whether it may advance.
    let since = svc.rollout.as_ref().map(|r| {
        let held = Duration::from_millis(r.held_ms(now_ms));
        now.checked_sub(held).unwrap_or(now)
    });
    let obs = observe(svc, now, None);
    let verdict = if bp == 0 {
        Verdict::Inconclusive
    } else {
        evaluate(cfg, &obs)
    };
    if let (Verdict::Bad(t), Some(_)) = (&verdict, &svc.rollout) {
        *last_bad = Some((now_ms, format!("a bad analysis ({}: {})", t.kind, t.detail)));
    }
    if cfg.enabled && bp > 0 {
        match tracker.decide(cfg, &verdict, &obs) {
            Decision::Hold => *both_bad_logged = false,
            Decision::Rollback(trigger) => {
                let to = rollback_target(cfg, bp);
                let reason = format!("{}: {}", trigger.kind, trigger.detail);
                tracing::error!(service = %svc.name, trigger = trigger.kind, detail = %trigger.detail, to_percent = f64::from(to) / 100.0, "automatic rollback");
                let cmd = Command::AutoRollback {
                    service: name.clone(),
                    to_bp: to,
                    reason: reason.clone(),
                    at_ms: now_ms,
                };
                if table
                    .apply(Change::new(cmd, Origin::Rollback, "rollback").reason(Some(reason)))
                    .is_ok()
                {
                    table
                        .metrics()
                        .rollbacks
                        .with_label_values(&[&name, trigger.kind])
                        .inc();
                }
                tracker.consecutive_bad = 0;
                return;
            }
            Decision::BothBad(trigger) => {
                if !*both_bad_logged {
                    *both_bad_logged = true;
                    tracing::error!(service = %svc.name, trigger = trigger.kind, detail = %trigger.detail, "candidate is failing but the stable color is too: holding traffic where it is");
                    table
                        .metrics()
                        .rollbacks_held
                        .with_label_values(&[&name])
                        .inc();
                }
                return;
            }
        }
    }
    let (Some(r), Some(plan)) = (&svc.rollout, &svc.config.rollout) else {
        return;
    };
    let since_step = svc
        .pool(svc.split.candidate())
        .metrics
        .window
        .summary(now, since);
    let last_bad_ms = last_bad.as_ref().map(|(at, _)| *at);
    if let Some(step) = next_step(r, plan, now_ms, last_bad_ms, &verdict, &since_step) {
        tracing::info!(service = %svc.name, step, percent = f64::from(r.steps[step]) / 100.0, requests = since_step.requests, failures = since_step.failures, "rollout advances");
        let promoted = if r.steps[step] >= crate::split::BUCKETS {
            "final step, candidate promoted: "
        } else {
            ""
        };
        let reason = format!(
            "{promoted}held {}s ({}s clean) with a healthy analysis: {}/{} candidate requests failed",
            r.held_ms(now_ms) / 1000,
            clean_ms(r, now_ms, last_bad_ms) / 1000,
            since_step.failures,
            since_step.requests
        );
        let cmd = Command::RolloutAdvance {
            service: name,
            step,
            at_ms: now_ms,
        };
        let _ = table.apply(Change::new(cmd, Origin::Rollout, "rollout").reason(Some(reason)));
    } else if r.paused_at_ms.is_none()
        && r.held_ms(now_ms) >= plan.hold.as_millis() as u64
        && *hold_noted != Some((r.step, r.step_started_ms))
    {
        // The hold is over but the analysis does not let the step advance:
        // say why, once per step.
        *hold_noted = Some((r.step, r.step_started_ms));
        let clean = clean_ms(r, now_ms, last_bad_ms);
        let why = match (&verdict, last_bad.as_ref()) {
            (Verdict::Bad(t), _) => format!("analysis bad ({}: {})", t.kind, t.detail),
            (_, Some((at, what))) if clean < plan.hold.as_millis() as u64 => format!(
                "{what} {:.1}s ago; the hold counts from then",
                now_ms.saturating_sub(*at) as f64 / 1000.0
            ),
            _ if since_step.requests < plan.min_requests => format!(
                "only {} candidate requests since the step began (needs {})",
                since_step.requests, plan.min_requests
            ),
            _ => "analysis inconclusive".to_string(),
        };
        tracing::info!(service = %svc.name, step = r.step, %why, "rollout holds");
        table.note(
            Origin::Rollout,
            "rollout",
            "rollout_hold",
            Some(&name),
            Some(format!(
                "step {} holds past its {}s hold: {why}",
                r.step,
                plan.hold.as_secs()
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RollbackConfig {
        crate::config::Config::parse(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"s\"\nblue = { endpoints = [\"127.0.0.1:1\"] }\ngreen = { endpoints = [\"127.0.0.1:2\"] }\n",
        )
        .unwrap()
        .services[0]
        .rollback
        .clone()
    }

    fn sum(requests: u64, failures: u64, p99_ms: u64) -> Summary {
        Summary {
            requests,
            failures,
            p99: Some(Duration::from_millis(p99_ms)),
        }
    }

    fn obs(c: Summary, s: Summary) -> Observation {
        Observation {
            candidate: c,
            stable: s,
            candidate_up: 1.0,
            stable_up: 1.0,
        }
    }

    #[test]
    fn triggers() {
        let c = cfg();
        assert_eq!(
            evaluate(&c, &obs(sum(500, 1, 10), sum(5000, 5, 10))),
            Verdict::Healthy
        );
        // Too little traffic: hold, even at 100 % failures.
        assert_eq!(
            evaluate(&c, &obs(sum(10, 10, 10), sum(5000, 0, 10))),
            Verdict::Inconclusive
        );
        let kind = |v: Verdict| match v {
            Verdict::Bad(t) => t.kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(evaluate(&c, &obs(sum(100, 100, 10), sum(1000, 0, 10)))),
            "failure_ratio"
        );
        // 4 % absolute is under the 5 % limit, but far worse than stable's 0.1 %.
        assert_eq!(
            kind(evaluate(&c, &obs(sum(5000, 200, 10), sum(50000, 50, 10)))),
            "relative_failures"
        );
        // The same 4 % with a stable color that also fails 4 % is fine.
        assert_eq!(
            evaluate(&c, &obs(sum(5000, 200, 10), sum(50000, 2000, 10))),
            Verdict::Healthy
        );
        // A slow candidate.
        assert_eq!(
            kind(evaluate(&c, &obs(sum(500, 0, 900), sum(5000, 0, 20)))),
            "latency"
        );
        // Slow in ratio but under the floor: fine.
        assert_eq!(
            evaluate(&c, &obs(sum(500, 0, 100), sum(5000, 0, 5))),
            Verdict::Healthy
        );
        // Endpoints down count even without traffic.
        let mut o = obs(sum(0, 0, 0), sum(0, 0, 0));
        o.candidate_up = 0.0;
        assert_eq!(kind(evaluate(&c, &o)), "candidate_unhealthy");
    }

    #[test]
    fn small_samples_do_not_trip_the_absolute_limit() {
        let c = cfg();
        // 2 of 20 is 10 %, but the 95 % lower bound (~2.8 %) is under 5 %.
        assert_eq!(
            evaluate(&c, &obs(sum(20, 2, 10), sum(20, 0, 10))),
            Verdict::Healthy
        );
    }

    #[test]
    fn consecutive_bad_windows_and_both_bad() {
        let c = cfg();
        let bad = obs(sum(100, 100, 10), sum(1000, 0, 10));
        let v = evaluate(&c, &bad);
        let mut t = Tracker::default();
        assert_eq!(t.decide(&c, &v, &bad), Decision::Hold);
        assert_eq!(t.decide(&c, &v, &bad), Decision::Hold);
        assert!(matches!(t.decide(&c, &v, &bad), Decision::Rollback(_)));
        // A healthy evaluation in between resets the count: no flapping.
        let mut t = Tracker::default();
        t.decide(&c, &v, &bad);
        t.decide(&c, &v, &bad);
        t.decide(&c, &Verdict::Healthy, &bad);
        assert_eq!(t.decide(&c, &v, &bad), Decision::Hold);
        // Both colors failing: hold.
        let both = obs(sum(100, 100, 10), sum(1000, 900, 10));
        let mut t = Tracker::default();
        for _ in 0..2 {
            t.decide(&c, &v, &both);
        }
        assert!(matches!(t.decide(&c, &v, &both), Decision::BothBad(_)));
        let mut down = bad;
        down.stable_up = 0.0;
        let mut t = Tracker::default();
        for _ in 0..2 {
            t.decide(&c, &v, &down);
        }
        assert!(matches!(t.decide(&c, &v, &down), Decision::BothBad(_)));
    }

    #[test]
    fn step_down_targets() {
        let mut c = cfg();
        assert_eq!(rollback_target(&c, 2500), 0);
        c.step_down = vec![1000, 100];
        assert_eq!(rollback_target(&c, 2500), 1000);
        assert_eq!(rollback_target(&c, 1000), 100);
        assert_eq!(rollback_target(&c, 100), 0);
    }

    #[test]
    fn rollout_steps_need_hold_health_and_samples() {
        let plan = RolloutConfig {
            steps: vec![100, 500, 10_000],
            hold: Duration::from_secs(60),
            min_requests: 20,
            preflight: vec![],
        };
        let r = RolloutState {
            step: 0,
            steps: plan.steps.clone(),
            step_started_ms: 1_000_000,
            paused_at_ms: None,
        };
        let enough = sum(100, 0, 10);
        let t = 1_000_000;
        assert_eq!(
            next_step(&r, &plan, t + 59_000, None, &Verdict::Healthy, &enough),
            None,
            "hold not over"
        );
        assert_eq!(
            next_step(&r, &plan, t + 60_000, None, &Verdict::Healthy, &enough),
            Some(1)
        );
        assert_eq!(
            next_step(&r, &plan, t + 60_000, None, &Verdict::Inconclusive, &enough),
            None
        );
        assert_eq!(
            next_step(
                &r,
                &plan,
                t + 60_000,
                None,
                &Verdict::Healthy,
                &sum(5, 0, 10)
            ),
            None,
            "too few samples"
        );
        let paused = RolloutState {
            paused_at_ms: Some(t + 30_000),
            ..r.clone()
        };
        assert_eq!(
            next_step(
                &paused,
                &plan,
                t + 600_000,
                None,
                &Verdict::Healthy,
                &enough
            ),
            None
        );
        assert_eq!(
            paused.held_ms(t + 600_000),
            30_000,
            "the hold stops while paused"
        );
        let last = RolloutState {
            step: 1,
            ..r.clone()
        };
        assert_eq!(
            next_step(&last, &plan, t + 60_000, None, &Verdict::Healthy, &enough),
            Some(2)
        );
        let done = RolloutState { step: 2, ..r };
        assert_eq!(
            next_step(&done, &plan, t + 60_000, None, &Verdict::Healthy, &enough),
            None
        );
    }

    #[test]
    fn a_bad_sign_restarts_the_hold() {
        let plan = RolloutConfig {
            steps: vec![100, 10_000],
            hold: Duration::from_secs(60),
            min_requests: 20,
            preflight: vec![],
        };
        let t = 1_000_000;
        let r = RolloutState {
            step: 0,
            steps: plan.steps.clone(),
            step_started_ms: t,
            paused_at_ms: None,
        };
        let enough = sum(100, 0, 10);
        let at = |now, bad| next_step(&r, &plan, now, bad, &Verdict::Healthy, &enough);
        assert_eq!(at(t + 60_000, None), Some(1));
        // A bad sign 30 s into the step: the hold counts from there.
        assert_eq!(clean_ms(&r, t + 60_000, Some(t + 30_000)), 30_000);
        assert_eq!(at(t + 60_000, Some(t + 30_000)), None);
        assert_eq!(at(t + 89_999, Some(t + 30_000)), None);
        assert_eq!(at(t + 90_000, Some(t + 30_000)), Some(1));
        // A bad sign from before the step (the previous one) does not count.
        assert_eq!(at(t + 60_000, Some(t - 1)), Some(1));
        assert_eq!(clean_ms(&r, t + 60_000, Some(t - 1)), 60_000);
        // Paused: the clean hold never exceeds the held time.
        let paused = RolloutState {
            paused_at_ms: Some(t + 10_000),
            ..r.clone()
        };
        assert_eq!(clean_ms(&paused, t + 600_000, Some(t + 5_000)), 5_000);
    }
}
