//! The routing table: one immutable [`RoutingTable`] snapshot behind an
//! `ArcSwap`, replaced whole by [`Table::apply`].
//!
//! Requests call [`Table::snapshot`] once each and never lock: each thread
//! keeps the last table it read and reuses it until a writer commits again
//! (one atomic load to tell). The control plane reads with [`Table::load`].
//! Writers serialize on a mutex readers never touch, build the next table
//! from the current one (generation + 1) and store it. Commands are data
//! ([`Command`]), applied by the pure [`RoutingTable::with_command`], so every
//! outcome is testable without sockets:
//!
//! | outcome | meaning |
//! | --- | --- |
//! | `Ok(Applied::Changed { generation })` | a new table is live |
//! | `Ok(Applied::NoChange { generation })` | the command asked for what is already live |
//! | `Err(TableError::StaleGeneration { .. })` | `if_generation` did not match: nothing changed |
//! | `Err(TableError::Invalid { .. })`, `UnknownService`, `UnknownEndpoint` | rejected: nothing changed |

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use http::HeaderName;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};

use crate::config::{Color, Config, HostPattern, ServiceConfig, UpstreamSettings};
use crate::metrics::{Metrics, PoolMetrics, ServiceGauges};
use crate::split::{seed_for_salt, SplitPolicy, BUCKETS};
use crate::upstream::Upstream;

/// One endpoint as the snapshot sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Live connections and load; shared with later tables.
    pub upstream: Arc<Upstream>,
    /// Drained by an operator: no new requests.
    pub drained: bool,
    /// Health verdict (active/passive checks): unhealthy gets no traffic.
    pub healthy: bool,
    /// `cyan_endpoint_up` for this endpoint, resolved once (see
    /// [`publish_gauges`]).
    pub up: IntGauge,
}

impl Endpoint {
    pub fn eligible(&self) -> bool {
        self.healthy && !self.drained
    }
}

/// A service's blue or green pool.
#[derive(Debug, Clone)]
pub struct Pool {
    pub color: Color,
    pub endpoints: Vec<Endpoint>,
    /// Indices into `endpoints` of those that may take traffic.
    pub eligible: Vec<usize>,
    /// The eligible endpoints' upstreams, in `eligible`'s order, kept by
    /// [`Pool::refresh`]: the pick reads two in-flight counts through one
    /// pointer each, not through `eligible` and `endpoints` (a load less
    /// on the chain every request waits on).
    picks: Box<[Arc<Upstream>]>,
    pub metrics: Arc<PoolMetrics>,
}

impl Pool {
    /// Recomputes the eligible set after endpoint flags changed.
    pub fn refresh(&mut self) {
        self.eligible = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].eligible())
            .collect();
        self.picks = self
            .eligible
            .iter()
            .map(|&i| self.endpoints[i].upstream.clone())
            .collect();
    }

    /// Picks an endpoint by power of two choices on in-flight requests,
    /// optionally avoiding one (a retry). Returns an index into `endpoints`.
    #[inline]
    pub fn pick(&self, avoid: Option<usize>) -> Option<usize> {
        let exclude = avoid.and_then(|a| self.eligible.iter().position(|&i| i == a));
        crate::split::p2c(self.picks.len(), exclude, |i| self.picks[i].in_flight())
            .map(|i| self.eligible[i])
    }
}

/// A progressive rollout in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// Index into `steps` of the live step.
    pub step: usize,
    /// The plan's shares in basis points, as it was when the rollout started.
    pub steps: Vec<u16>,
    /// When the live step began (Unix ms): its hold is measured from here,
    /// across restarts.
    pub step_started_ms: u64,
    /// Set while paused; the hold does not run meanwhile.
    pub paused_at_ms: Option<u64>,
}

impl RolloutState {
    /// How long the live step has held at `now_ms`, pauses excluded.
    pub fn held_ms(&self, now_ms: u64) -> u64 {
        let end = self.paused_at_ms.unwrap_or(now_ms);
        end.saturating_sub(self.step_started_ms)
    }
}

/// Why and when automatic rollback moved traffic back; stays until an
/// operator acts (split, promote, rollback, rollout start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackLatch {
    pub reason: String,
    pub at_ms: u64,
}

/// A service in a snapshot.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: Arc<str>,
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    pub split: SplitPolicy,
    pub color_header: Option<HeaderName>,
    /// `[blue, green]`.
    pub pools: [Pool; 2],
    pub config: Arc<ServiceConfig>,
    pub rollout: Option<RolloutState>,
    pub rolled_back: Option<RollbackLatch>,
    /// Its table-level gauges, shared by every later table.
    pub gauges: Arc<ServiceGauges>,
}

impl Service {
    pub fn pool(&self, color: Color) -> &Pool {
        &self.pools[color.index()]
    }

    pub fn pool_mut(&mut self, color: Color) -> &mut Pool {
        &mut self.pools[color.index()]
    }
}

/// One (host pattern, path prefix) → service entry of a listener's route
/// list. Entries are sorted most specific first — exact host, then wildcard
/// (longer first), then `*`; then the longer path prefix — so the first entry
/// that matches a request is the best match.
#[derive(Debug)]
struct RouteEntry {
    host: HostPattern,
    prefix: Box<str>,
    service: usize,
}

impl RouteEntry {
    fn rank(&self) -> (u8, usize, usize) {
        let (r, len) = match &self.host {
            HostPattern::Exact(e) => (3, e.len()),
            HostPattern::Suffix(s) => (2, s.len()),
            HostPattern::Any => (1, 0),
        };
        (r, len, self.prefix.len())
    }

    #[inline]
    fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match &self.host {
            HostPattern::Exact(e) => host.eq_ignore_ascii_case(e),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            HostPattern::Any => true,
        };
        host_ok && path_matches(&self.prefix, path)
    }
}

/// `/api` matches `/api`, `/api/x`, `/api?q` but not `/apix`.
#[inline]
fn path_matches(prefix: &str, path: &str) -> bool {
    // Every prefix starts with '/' (config): one byte long, it is "/".
    debug_assert!(prefix.starts_with('/'));
    if prefix.len() == 1 {
        return true;
    }
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
    }
}

/// Strips the port from a Host value: `example.com:8080` → `example.com`,
/// `[::1]:8080` → `[::1]`.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        // Back over the port's digits to a colon, if there is one: a
        // reverse `find` called memrchr for a dozen bytes (~7 % of a route
        // decision, `perf`).
        let b = host.as_bytes();
        let mut i = b.len();
        while i > 0 && b[i - 1].is_ascii_digit() {
            i -= 1;
        }
        if i > 0 && b[i - 1] == b':' {
            &host[..i - 1]
        } else {
            host
        }
    }
}

/// An immutable snapshot of everything routing depends on.
#[derive(Debug)]
pub struct RoutingTable {
    pub generation: u64,
    pub services: Vec<Service>,
    /// For each listener (by index), its route entries, most specific first.
    /// Shared by every generation: commands never change routing.
    routes: Arc<Vec<Vec<RouteEntry>>>,
    pub listener_names: Vec<String>,
}

impl RoutingTable {
    /// Builds a table from config. With a `previous` table, services it has
    /// keep their dynamic state (stable color, split, endpoint drain and
    /// health flags) and endpoints with unchanged settings keep their live
    /// [`Upstream`] (idle connections, load).
    pub fn build(
        config: &Config,
        metrics: &Metrics,
        previous: Option<&RoutingTable>,
        generation: u64,
    ) -> Result<RoutingTable, String> {
        let mut services = Vec::with_capacity(config.services.len());
        for sc in &config.services {
            let prev = previous.and_then(|t| t.service(&sc.name));
            let mk_pool = |color: Color| -> Result<Pool, String> {
                let pc = sc.pool(color);
                let prev_pool = prev.map(|s| s.pool(color));
                let pool_metrics = match prev_pool {
                    Some(p) => p.metrics.clone(),
                    None => Arc::new(metrics.pool(&sc.name, color, sc.rollback.bucket)),
                };
                let mut endpoints = Vec::with_capacity(pc.endpoints.len());
                for &addr in &pc.endpoints {
                    let prev_ep =
                        prev_pool.and_then(|p| p.endpoints.iter().find(|e| e.addr == addr));
                    let upstream = match prev_ep {
                        Some(e) if e.upstream.settings == pc.upstream => e.upstream.clone(),
                        _ => Arc::new(new_upstream(addr, &pc.upstream)?),
                    };
                    endpoints.push(Endpoint {
                        addr,
                        upstream,
                        drained: prev_ep.is_some_and(|e| e.drained),
                        healthy: prev_ep.is_none_or(|e| e.healthy),
                        up: match prev_ep {
                            Some(e) => e.up.clone(),
                            None => metrics.endpoint_gauge(&sc.name, color, addr),
                        },
                    });
                }
                let mut pool = Pool {
                    color,
                    endpoints,
                    eligible: Vec::new(),
                    picks: Box::default(),
                    metrics: pool_metrics,
                };
                pool.refresh();
                Ok(pool)
            };
            let pools = [mk_pool(Color::Blue)?, mk_pool(Color::Green)?];
            services.push(Service {
                name: sc.name.as_str().into(),
                hosts: sc.hosts.clone(),
                path_prefix: sc.path_prefix.clone(),
                split: SplitPolicy {
                    // The live split survives a rebuild; the config's values
                    // only seed a service the table has not seen.
                    stable: prev.map_or(sc.stable, |p| p.split.stable),
                    candidate_bp: prev.map_or(sc.candidate_bp, |p| p.split.candidate_bp),
                    sticky: sc.sticky.clone(),
                    seed: seed_for_salt(&sc.salt),
                    override_: sc.override_.clone(),
                },
                color_header: sc.color_header.clone(),
                pools,
                config: Arc::new(sc.clone()),
                rollout: prev.and_then(|p| p.rollout.clone()),
                rolled_back: prev.and_then(|p| p.rolled_back.clone()),
                gauges: match prev {
                    Some(p) => p.gauges.clone(),
                    None => Arc::new(metrics.service_gauges(&sc.name)),
                },
            });
        }
        let listener_names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let routes = listener_names
            .iter()
            .map(|l| {
                let mut entries: Vec<RouteEntry> = Vec::new();
                for (i, sc) in config.services.iter().enumerate() {
                    if !(sc.listeners.is_empty() || sc.listeners.contains(l)) {
                        continue;
                    }
                    for h in &sc.hosts {
                        entries.push(RouteEntry {
                            host: h.clone(),
                            prefix: sc.path_prefix.as_str().into(),
                            service: i,
                        });
                    }
                }
                // Stable: equal ranks keep config order.
                entries.sort_by_key(|e| std::cmp::Reverse(e.rank()));
                entries
            })
            .collect();
        Ok(RoutingTable {
            generation,
            services,
            routes: Arc::new(routes),
            listener_names,
        })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name == name)
    }

    fn service_index(&self, name: &str) -> Result<usize, TableError> {
        self.services
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| TableError::UnknownService(name.to_string()))
    }

    /// The most specific service for a request on `listener` (an index into
    /// the config's listeners): exact host beats wildcard beats `*`, then the
    /// longest path prefix. `host` may carry a port.
    #[inline]
    pub fn route(&self, listener: usize, host: &str, path: &str) -> Option<&Service> {
        self.route_index(listener, host, path)
            .map(|i| &self.services[i])
    }

    /// [`RoutingTable::route`] as an index into `services`.
    #[inline]
    pub fn route_index(&self, listener: usize, host: &str, path: &str) -> Option<usize> {
        let host = host_without_port(host);
        self.routes
            .get(listener)?
            .iter()
            .find(|e| e.matches(host, path))
            .map(|e| e.service)
    }

    /// Applies a command to a copy of this table: `Ok(None)` when it would
    /// change nothing.
    pub fn with_command(&self, cmd: &Command) -> Result<Option<RoutingTable>, TableError> {
        let idx = self.service_index(cmd.service())?;
        let mut svc = self.services[idx].clone();
        let invalid = |reason: &str| TableError::Invalid {
            field: "rollout".into(),
            reason: reason.into(),
        };
        let changed = match cmd {
            Command::AutoRollback {
                to_bp,
                reason,
                at_ms,
                ..
            } => {
                svc.split.candidate_bp = (*to_bp).min(svc.split.candidate_bp);
                svc.rollout = None;
                svc.rolled_back = Some(RollbackLatch {
                    reason: reason.clone(),
                    at_ms: *at_ms,
                });
                true
            }
            Command::RolloutStart { steps, at_ms, .. } => {
                if svc.rollout.is_some() {
                    return Err(invalid("a rollout is already running"));
                }
                let Some(&first) = steps.first() else {
                    return Err(invalid("the plan has no steps"));
                };
                // The same rules as `[service.rollout] steps`: a step past
                // 100 % would put the split out of range.
                if steps.iter().any(|&bp| bp == 0 || bp > BUCKETS)
                    || steps.windows(2).any(|w| w[1] <= w[0])
                {
                    return Err(invalid(
                        "steps must be strictly increasing, each in 1..=10000 basis points",
                    ));
                }
                svc.rollout = Some(RolloutState {
                    step: 0,
                    steps: steps.clone(),
                    step_started_ms: *at_ms,
                    paused_at_ms: None,
                });
                svc.rolled_back = None;
                svc.split.candidate_bp = first;
                true
            }
            Command::RolloutAdvance { step, at_ms, .. } => {
                let Some(r) = svc.rollout.as_mut() else {
                    return Err(invalid("no rollout is running"));
                };
                if *step != r.step + 1 || *step >= r.steps.len() {
                    return Err(invalid("a rollout advances one step at a time"));
                }
                let bp = r.steps[*step];
                if bp >= BUCKETS {
                    // The final step promotes: the candidate becomes stable.
                    svc.split.stable = svc.split.stable.other();
                    svc.split.candidate_bp = 0;
                    svc.rollout = None;
                } else {
                    r.step = *step;
                    r.step_started_ms = *at_ms;
                    svc.split.candidate_bp = bp;
                }
                true
            }
            Command::RolloutPause { at_ms, .. } => match svc.rollout.as_mut() {
                None => return Err(invalid("no rollout is running")),
                Some(r) if r.paused_at_ms.is_some() => false,
                Some(r) => {
                    r.paused_at_ms = Some(*at_ms);
                    true
                }
            },
            Command::RolloutResume { at_ms, .. } => match svc.rollout.as_mut() {
                None => return Err(invalid("no rollout is running")),
                Some(r) => match r.paused_at_ms.take() {
                    None => false,
                    Some(p) => {
                        // The time spent paused does not count as hold.
                        r.step_started_ms += at_ms.saturating_sub(p);
                        true
                    }
                },
            },
            Command::RolloutAbort { .. } => {
                if svc.rollout.is_none() {
                    return Err(invalid("no rollout is running"));
                }
                svc.rollout = None;
                svc.split.candidate_bp = 0;
                true
            }
            Command::SetSplit { candidate_bp, .. } => {
                if *candidate_bp > BUCKETS {
                    return Err(TableError::Invalid {
                        field: "candidate_percent".into(),
                        reason: format!(
                            "{} is out of range 0..100",
                            f64::from(*candidate_bp) / 100.0
                        ),
                    });
                }
                let changed = svc.split.candidate_bp != *candidate_bp
                    || svc.rollout.is_some()
                    || svc.rolled_back.is_some();
                svc.split.candidate_bp = *candidate_bp;
                // An operator's hand ends a running rollout and clears a
                // rollback latch: what they set is what stays.
                svc.rollout = None;
                svc.rolled_back = None;
                changed
            }
            Command::Promote { .. } => {
                // The candidate takes all traffic and becomes the stable color.
                svc.split.stable = svc.split.stable.other();
                svc.split.candidate_bp = 0;
                svc.rollout = None;
                svc.rolled_back = None;
                true
            }
            Command::Rollback { .. } => {
                let changed = svc.split.candidate_bp != 0 || svc.rollout.is_some();
                svc.split.candidate_bp = 0;
                svc.rollout = None;
                changed
            }
            Command::SetDrained { addr, drained, .. } => {
                set_endpoint_flag(&mut svc, None, *addr, |e| &mut e.drained, *drained)?
            }
            Command::SetHealth {
                color,
                addr,
                healthy,
                ..
            } => set_endpoint_flag(&mut svc, Some(*color), *addr, |e| &mut e.healthy, *healthy)?,
        };
        if !changed {
            return Ok(None);
        }
        let mut services = self.services.clone();
        services[idx] = svc;
        Ok(Some(RoutingTable {
            generation: self.generation + 1,
            services,
            routes: self.routes.clone(),
            listener_names: self.listener_names.clone(),
        }))
    }
}

fn set_endpoint_flag(
    svc: &mut Service,
    color: Option<Color>,
    addr: SocketAddr,
    field: impl Fn(&mut Endpoint) -> &mut bool,
    value: bool,
) -> Result<bool, TableError> {
    let colors = match color {
        Some(c) => vec![c],
        None => vec![Color::Blue, Color::Green],
    };
    let mut found = false;
    let mut changed = false;
    for c in colors {
        let pool = svc.pool_mut(c);
        for e in pool.endpoints.iter_mut().filter(|e| e.addr == addr) {
            found = true;
            let f = field(e);
            changed |= *f != value;
            *f = value;
        }
        pool.refresh();
    }
    if !found {
        return Err(TableError::UnknownEndpoint {
            service: svc.name.to_string(),
            addr,
        });
    }
    Ok(changed)
}

fn new_upstream(addr: SocketAddr, settings: &UpstreamSettings) -> Result<Upstream, String> {
    let tls = match &settings.tls {
        Some(t) => Some(
            crate::tls::upstream_tls(t, settings.protocol, addr)
                .map_err(|e| format!("upstream TLS for {addr}: {e}"))?,
        ),
        None => None,
    };
    Ok(Upstream::new(addr, settings.clone(), tls))
}

/// A change to the live table. Serialized (tagged by `action`) into the
/// audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Command {
    /// Sets the candidate's share in basis points.
    SetSplit {
        service: String,
        candidate_bp: u16,
    },
    /// The candidate takes 100 % and becomes the stable color.
    Promote {
        service: String,
    },
    /// The stable color takes 100 %.
    Rollback {
        service: String,
    },
    /// Drains or undrains an endpoint (in whichever pool lists it).
    SetDrained {
        service: String,
        addr: SocketAddr,
        drained: bool,
    },
    /// Records a health verdict for an endpoint.
    SetHealth {
        service: String,
        color: Color,
        addr: SocketAddr,
        healthy: bool,
    },
    /// The rollback policy moves the candidate's share down to `to_bp` (0,
    /// or the next step down) and latches the service.
    AutoRollback {
        service: String,
        to_bp: u16,
        reason: String,
        at_ms: u64,
    },
    /// Starts a rollout at its first step.
    RolloutStart {
        service: String,
        steps: Vec<u16>,
        at_ms: u64,
    },
    /// Moves a rollout to `step` (the next one); the last step promotes.
    RolloutAdvance {
        service: String,
        step: usize,
        at_ms: u64,
    },
    RolloutPause {
        service: String,
        at_ms: u64,
    },
    RolloutResume {
        service: String,
        at_ms: u64,
    },
    /// Ends a rollout; the stable color takes 100 %.
    RolloutAbort {
        service: String,
        reason: String,
    },
}

impl Command {
    /// The command's name as the audit log spells it.
    pub fn action(&self) -> &'static str {
        match self {
            Command::SetSplit { .. } => "set_split",
            Command::Promote { .. } => "promote",
            Command::Rollback { .. } => "rollback",
            Command::SetDrained { drained: true, .. } => "drain",
            Command::SetDrained { drained: false, .. } => "undrain",
            Command::SetHealth { healthy: true, .. } => "endpoint_up",
            Command::SetHealth { healthy: false, .. } => "endpoint_down",
            Command::AutoRollback { .. } => "auto_rollback",
            Command::RolloutStart { .. } => "rollout_start",
            Command::RolloutAdvance { .. } => "rollout_step",
            Command::RolloutPause { .. } => "rollout_pause",
            Command::RolloutResume { .. } => "rollout_resume",
            Command::RolloutAbort { .. } => "rollout_abort",
        }
    }

    pub fn service(&self) -> &str {
        match self {
            Command::SetSplit { service, .. }
            | Command::Promote { service }
            | Command::Rollback { service }
            | Command::SetDrained { service, .. }
            | Command::SetHealth { service, .. }
            | Command::AutoRollback { service, .. }
            | Command::RolloutStart { service, .. }
            | Command::RolloutAdvance { service, .. }
            | Command::RolloutPause { service, .. }
            | Command::RolloutResume { service, .. }
            | Command::RolloutAbort { service, .. } => service,
        }
    }
}

/// Who or what asked for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A person, over the admin API or `cyan ctl`.
    Operator,
    /// The progressive rollout driver.
    Rollout,
    /// The automatic rollback policy.
    Rollback,
    /// Active or passive health checks.
    Health,
    /// A config (re)load.
    Config,
}

/// A command with its preconditions and provenance.
#[derive(Debug, Clone)]
pub struct Change {
    pub command: Command,
    /// Apply only if the live generation is still this one.
    pub if_generation: Option<u64>,
    pub origin: Origin,
    /// `uid:1000`, `token:ops-alice`, `rollout`, …
    pub actor: String,
    pub reason: Option<String>,
}

impl Change {
    pub fn new(command: Command, origin: Origin, actor: impl Into<String>) -> Change {
        Change {
            command,
            if_generation: None,
            origin,
            actor: actor.into(),
            reason: None,
        }
    }

    pub fn if_generation(mut self, generation: Option<u64>) -> Change {
        self.if_generation = generation;
        self
    }

    pub fn reason(mut self, reason: Option<String>) -> Change {
        self.reason = reason;
        self
    }
}

impl From<Command> for Change {
    fn from(command: Command) -> Change {
        Change::new(command, Origin::Operator, "internal")
    }
}

/// What [`ChangeSink::committed`] is told about a change that went live.
#[derive(Debug)]
pub struct ChangeEvent<'a> {
    /// The command, or `None` for a config reload.
    pub command: Option<&'a Command>,
    pub origin: Origin,
    pub actor: &'a str,
    pub reason: Option<&'a str>,
    pub before: &'a RoutingTable,
    pub after: &'a RoutingTable,
}

/// Receives every committed change, in order, under the writer lock: the
/// audit log and the state file.
pub trait ChangeSink: Send + Sync + std::fmt::Debug {
    fn committed(&self, event: &ChangeEvent<'_>);

    /// Records something that is not a table change (a rollout holding, a
    /// rejected reload).
    fn note(
        &self,
        origin: Origin,
        actor: &str,
        action: &str,
        service: Option<&str>,
        generation: u64,
        reason: Option<String>,
    ) {
        let _ = (origin, actor, action, service, generation, reason);
    }
}

/// A successful `apply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed { generation: u64 },
    NoChange { generation: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("stale generation: expected {expected}, live is {current}")]
    StaleGeneration { expected: u64, current: u64 },
    #[error("no service named `{0}`")]
    UnknownService(String),
    #[error("service `{service}` has no endpoint {addr}")]
    UnknownEndpoint { service: String, addr: SocketAddr },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// The live table and its single write path.
#[derive(Debug)]
pub struct Table {
    current: ArcSwap<RoutingTable>,
    /// Names what `current` holds: a new stamp is stored after every store
    /// of `current`. Stamps come from [`STAMPS`], so no two tables (nor two
    /// versions of one) ever share one, and a thread's copy
    /// ([`Table::snapshot`]) is valid while its stamp is still this.
    stamp: AtomicU64,
    writer: Mutex<()>,
    metrics: Arc<Metrics>,
    sink: OnceLock<Arc<dyn ChangeSink>>,
}

/// Where stamps come from: every table stored in any [`Table`] takes the
/// next (a `u64` is not used up).
static STAMPS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's last [`Table::snapshot`]: the stamp it was read under
    /// and the table. Held weakly: a table superseded (or a `Table` shut
    /// down) is dropped with its upstream connections when its last request
    /// ends, whatever the threads read last. A strong copy kept them open
    /// on threads that served nothing more (`tests/faults.rs` saw the
    /// sockets of a shut-down server stay open).
    static SNAPSHOT: RefCell<Option<(u64, Weak<RoutingTable>)>> = const { RefCell::new(None) };
}

impl Table {
    /// Builds generation 1 from config.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Table, String> {
        let table = RoutingTable::build(config, &metrics, None, 1)?;
        Ok(Table::from_table(table, metrics))
    }

    /// Serves an already built table (e.g. one restored from a state file).
    pub fn from_table(table: RoutingTable, metrics: Arc<Metrics>) -> Table {
        publish_gauges(&metrics, &table);
        Table {
            current: ArcSwap::from_pointee(table),
            stamp: AtomicU64::new(STAMPS.fetch_add(1, Ordering::Relaxed)),
            writer: Mutex::new(()),
            metrics,
            sink: OnceLock::new(),
        }
    }

    /// Sets where committed changes are recorded (once).
    pub fn set_sink(&self, sink: Arc<dyn ChangeSink>) {
        let _ = self.sink.set(sink);
    }

    /// Audits an event that changes nothing in the table.
    pub fn note(
        &self,
        origin: Origin,
        actor: &str,
        action: &str,
        service: Option<&str>,
        reason: Option<String>,
    ) {
        if let Some(sink) = self.sink.get() {
            sink.note(
                origin,
                actor,
                action,
                service,
                self.load().generation,
                reason,
            );
        }
    }

    fn commit(
        &self,
        cur: &RoutingTable,
        next: RoutingTable,
        event: impl FnOnce(&RoutingTable, &RoutingTable),
    ) -> u64 {
        let generation = next.generation;
        publish_gauges(&self.metrics, &next);
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.stamp
            .store(STAMPS.fetch_add(1, Ordering::Relaxed), Ordering::Release);
        event(cur, &next);
        generation
    }

    /// Waits until a change being committed right now has been written by
    /// the sink (audit line and `state.json`). The table is stored before
    /// it is persisted, so that a rollback moves traffic without waiting
    /// for a disk; a shutdown calls this so that no change the data plane
    /// already saw is missing from the state a restart reads.
    pub fn settle(&self) {
        drop(self.writer.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The live snapshot.
    #[inline]
    pub fn load(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// The live snapshot for a request; hold it for the whole request.
    /// While no change has been committed since this thread last read, it
    /// is this thread's copy: one atomic load and a weak reference's
    /// upgrade, 61 instructions where [`Table::load`] (arc-swap's debt
    /// slots) takes 91 (callgrind), 6.1 against 11.8 ns (`cargo bench
    /// --bench hot_path -- parts/snapshot`). A reader that sees a new
    /// stamp before the table it names reads a newer table than that
    /// stamp's, never an older one; a reader that still sees the old stamp
    /// reads as if just before the change.
    #[inline]
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        let stamp = self.stamp.load(Ordering::Acquire);
        SNAPSHOT
            .try_with(|cell| {
                let mut cached = cell.borrow_mut();
                // While the stamp matches, the table it names is live (or
                // was just superseded, its stamp not yet stored: gone, it
                // is read afresh).
                if let Some(t) = cached
                    .as_ref()
                    .filter(|(s, _)| *s == stamp)
                    .and_then(|(_, t)| t.upgrade())
                {
                    return t;
                }
                let t = self.current.load_full();
                *cached = Some((stamp, Arc::downgrade(&t)));
                t
            })
            // The thread is exiting and its copy is gone.
            .unwrap_or_else(|_| self.current.load_full())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Validates and applies a change; the only way the live table moves
    /// besides [`Table::replace_config`].
    pub fn apply(&self, change: Change) -> Result<Applied, TableError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load_full();
        if let Some(expected) = change.if_generation {
            if expected != cur.generation {
                return Err(TableError::StaleGeneration {
                    expected,
                    current: cur.generation,
                });
            }
        }
        match cur.with_command(&change.command)? {
            None => Ok(Applied::NoChange {
                generation: cur.generation,
            }),
            Some(next) => {
                let generation = self.commit(&cur, next, |before, after| {
                    if let Some(sink) = self.sink.get() {
                        sink.committed(&ChangeEvent {
                            command: Some(&change.command),
                            origin: change.origin,
                            actor: &change.actor,
                            reason: change.reason.as_deref(),
                            before,
                            after,
                        });
                    }
                });
                Ok(Applied::Changed { generation })
            }
        }
    }

    /// Rebuilds the table from a new config (a reload): static parts (pools,
    /// endpoints, timeouts, policies) come from `config`, the dynamic state
    /// of existing services is kept.
    pub fn replace_config(&self, config: &Config, actor: &str) -> Result<Applied, String> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load_full();
        let next = RoutingTable::build(config, &self.metrics, Some(&cur), cur.generation + 1)?;
        let generation = self.commit(&cur, next, |before, after| {
            if let Some(sink) = self.sink.get() {
                sink.committed(&ChangeEvent {
                    command: None,
                    origin: Origin::Config,
                    actor,
                    reason: Some("config reloaded"),
                    before,
                    after,
                });
            }
        });
        Ok(Applied::Changed { generation })
    }

    /// Closes idle upstream connections past their idle timeout.
    pub fn reap_idle(&self) {
        let t = self.load();
        for s in &t.services {
            for p in &s.pools {
                for e in &p.endpoints {
                    e.upstream.reap_idle();
                }
            }
        }
    }
}

/// Sets the table-level gauges from `t`, through handles the table carries:
/// no label lookups, no formatting, so a change applied every millisecond
/// costs the proxy's thread little (`benches/swap_under_load.rs`).
fn publish_gauges(m: &Metrics, t: &RoutingTable) {
    m.table_generation.set(t.generation as i64);
    for s in &t.services {
        s.gauges
            .rollout_step
            .set(s.rollout.as_ref().map_or(-1, |r| r.step as i64));
        s.gauges
            .candidate_share
            .set(f64::from(s.split.candidate_bp) / f64::from(BUCKETS));
        for pool in &s.pools {
            pool.metrics
                .stable
                .set((s.split.stable == pool.color) as i64);
            for e in &pool.endpoints {
                e.up.set(e.eligible() as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let cfg = Config::parse(
            r#"
[[listener]]
name = "public"
listen = "127.0.0.1:0"
[[listener]]
name = "internal"
listen = "127.0.0.1:1"

[[service]]
name = "gateway"
candidate_percent = 10
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"] }
green = { endpoints = ["127.0.0.1:9001"] }

[[service]]
name = "api"
hosts = ["api.example.com", "*.api.example.com"]
path_prefix = "/v2"
blue  = { endpoints = ["127.0.0.1:8101"] }
green = { endpoints = ["127.0.0.1:9101"] }

[[service]]
name = "admin-only"
hosts = ["admin.example.com"]
listeners = ["internal"]
blue  = { endpoints = ["127.0.0.1:8201"] }
green = { endpoints = ["127.0.0.1:9201"] }
"#,
        )
        .unwrap();
        Table::new(&cfg, Metrics::new()).unwrap()
    }

    #[test]
    fn routing_prefers_specific_matches() {
        let t = table().load();
        let name = |l, h, p| t.route(l, h, p).map(|s| s.name.to_string());
        assert_eq!(
            name(0, "api.example.com:443", "/v2/users").as_deref(),
            Some("api")
        );
        assert_eq!(name(0, "API.example.com", "/v2").as_deref(), Some("api"));
        assert_eq!(
            name(0, "eu.api.example.com", "/v2?x=1").as_deref(),
            Some("api")
        );
        assert_eq!(
            name(0, "api.example.com", "/v2x").as_deref(),
            Some("gateway")
        );
        assert_eq!(name(0, "other.example", "/v2").as_deref(), Some("gateway"));
        // Listener scoping.
        assert_eq!(
            name(0, "admin.example.com", "/").as_deref(),
            Some("gateway")
        );
        assert_eq!(
            name(1, "admin.example.com", "/").as_deref(),
            Some("admin-only")
        );
        assert!(t.route(7, "x", "/").is_none());
    }

    #[test]
    fn host_port_stripping() {
        assert_eq!(host_without_port("a.b:80"), "a.b");
        assert_eq!(host_without_port("a.b"), "a.b");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("a.b:"), "a.b");
        assert_eq!(host_without_port("a:b"), "a:b");
        assert_eq!(host_without_port("8080"), "8080");
        assert_eq!(host_without_port(":80"), "");
        assert_eq!(host_without_port("a:1:2"), "a:1");
        // Against the rule as first written: the last colon, when only
        // digits follow it.
        let reference = |h: &str| match h.rfind(':') {
            Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => h[..i].to_string(),
            _ => h.to_string(),
        };
        let alphabet = ['a', '.', ':', '1', '9', '-'];
        for n in 0..6u32 {
            for k in 0..alphabet.len().pow(n) {
                let mut h = String::new();
                let mut k = k;
                for _ in 0..n {
                    h.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                assert_eq!(host_without_port(&h), reference(&h), "{h:?}");
            }
        }
    }

    /// A request's snapshot is the live table: right after a change on
    /// the thread that made it, on a thread that read the old one before,
    /// and never another table's, even one built where a dropped table was.
    #[test]
    fn snapshot_follows_every_commit_and_never_mixes_tables() {
        let split = |bp| Command::SetSplit {
            service: "gateway".into(),
            candidate_bp: bp,
        };
        let bp = |t: &RoutingTable| t.service("gateway").unwrap().split.candidate_bp;
        let t = Arc::new(table());
        assert_eq!(t.snapshot().generation, 1);
        let reader = {
            let t = t.clone();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<u16>();
            let (seen_tx, seen_rx) = std::sync::mpsc::channel::<(u64, u16)>();
            let h = std::thread::spawn(move || {
                // Read (and keep a copy) before each change, then after it.
                let _ = t.snapshot();
                seen_tx.send((0, 0)).unwrap();
                while go_rx.recv().is_ok() {
                    let s = t.snapshot();
                    seen_tx.send((s.generation, bp(&s))).unwrap();
                }
            });
            (h, go_tx, seen_rx)
        };
        let (h, go, seen) = reader;
        assert_eq!(seen.recv().unwrap(), (0, 0));
        for (n, share) in [2500u16, 5000, 7500].into_iter().enumerate() {
            t.apply(split(share).into()).unwrap();
            let mine = t.snapshot();
            assert_eq!((mine.generation, bp(&mine)), (n as u64 + 2, share));
            go.send(share).unwrap();
            assert_eq!(seen.recv().unwrap(), (n as u64 + 2, share));
        }
        drop(go);
        h.join().unwrap();

        // Two tables read in turn on one thread: each its own.
        let other = table();
        other.apply(split(100).into()).unwrap();
        for _ in 0..3 {
            assert_eq!(bp(&t.snapshot()), 7500);
            assert_eq!(bp(&other.snapshot()), 100);
        }
        // A table dropped while this thread holds its copy, and a new one
        // (likely at the same address, at the same generation): the new
        // one's table, not the copy.
        drop(other);
        let again = table();
        assert_eq!(again.snapshot().generation, 1);
        assert_eq!(bp(&again.snapshot()), 1000);
        assert!(!Arc::ptr_eq(&again.snapshot(), &t.snapshot()));
        assert!(Arc::ptr_eq(&again.snapshot(), &again.load()));

        // A thread's copy keeps nothing alive: a superseded table is gone
        // once no request holds it, and so is a dropped `Table`'s.
        let old = Arc::downgrade(&again.snapshot());
        again.apply(split(2000).into()).unwrap();
        assert!(old.upgrade().is_none());
        let last = Arc::downgrade(&again.snapshot());
        drop(again);
        assert!(last.upgrade().is_none());
    }

    #[test]
    fn apply_outcomes() {
        let t = table();
        let split = |bp| Command::SetSplit {
            service: "gateway".into(),
            candidate_bp: bp,
        };
        assert_eq!(
            t.apply(split(1000).into()),
            Ok(Applied::NoChange { generation: 1 })
        );
        assert_eq!(
            t.apply(split(2500).into()),
            Ok(Applied::Changed { generation: 2 })
        );
        assert_eq!(
            t.load().service("gateway").unwrap().split.candidate_bp,
            2500
        );
        // Stale generation changes nothing.
        let stale = Change::from(split(5000)).if_generation(Some(1));
        assert_eq!(
            t.apply(stale),
            Err(TableError::StaleGeneration {
                expected: 1,
                current: 2
            })
        );
        assert_eq!(
            t.load().service("gateway").unwrap().split.candidate_bp,
            2500
        );
        let fresh = Change::from(split(5000)).if_generation(Some(2));
        assert_eq!(t.apply(fresh), Ok(Applied::Changed { generation: 3 }));
        // Invalid and unknown: nothing changes.
        assert!(matches!(
            t.apply(split(10_001).into()),
            Err(TableError::Invalid { .. })
        ));
        assert_eq!(
            t.apply(
                Command::Rollback {
                    service: "nope".into()
                }
                .into()
            ),
            Err(TableError::UnknownService("nope".into()))
        );
        assert_eq!(t.load().generation, 3);
    }

    #[test]
    fn promote_and_rollback() {
        let t = table();
        let svc = || t.load().service("gateway").unwrap().split.clone();
        t.apply(
            Command::Promote {
                service: "gateway".into(),
            }
            .into(),
        )
        .unwrap();
        assert_eq!((svc().stable, svc().candidate_bp), (Color::Green, 0));
        t.apply(
            Command::SetSplit {
                service: "gateway".into(),
                candidate_bp: 500,
            }
            .into(),
        )
        .unwrap();
        assert_eq!(
            svc().candidate(),
            Color::Blue,
            "the next upgrade ramps blue"
        );
        t.apply(
            Command::Rollback {
                service: "gateway".into(),
            }
            .into(),
        )
        .unwrap();
        assert_eq!((svc().stable, svc().candidate_bp), (Color::Green, 0));
        assert_eq!(
            t.apply(
                Command::Rollback {
                    service: "gateway".into()
                }
                .into()
            ),
            Ok(Applied::NoChange { generation: 4 })
        );
    }

    #[test]
    fn drain_and_health_shape_the_eligible_set() {
        let t = table();
        let a: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        let before = t.load();
        t.apply(
            Command::SetDrained {
                service: "gateway".into(),
                addr: a,
                drained: true,
            }
            .into(),
        )
        .unwrap();
        let pool = |t: &RoutingTable| t.service("gateway").unwrap().pool(Color::Blue).clone();
        let after = t.load();
        assert_eq!(pool(&after).eligible, vec![1]);
        for _ in 0..100 {
            assert_eq!(pool(&after).pick(None), Some(1));
        }
        // The old snapshot is untouched, and both share the live upstream.
        assert_eq!(pool(&before).eligible, vec![0, 1]);
        assert!(Arc::ptr_eq(
            &pool(&before).endpoints[0].upstream,
            &pool(&after).endpoints[0].upstream
        ));
        let b: SocketAddr = "127.0.0.1:8002".parse().unwrap();
        t.apply(
            Command::SetHealth {
                service: "gateway".into(),
                color: Color::Blue,
                addr: b,
                healthy: false,
            }
            .into(),
        )
        .unwrap();
        assert_eq!(pool(&t.load()).pick(None), None);
        let missing: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            t.apply(
                Command::SetDrained {
                    service: "gateway".into(),
                    addr: missing,
                    drained: true
                }
                .into()
            ),
            Err(TableError::UnknownEndpoint { .. })
        ));
    }

    #[test]
    fn pick_avoids_the_failed_endpoint() {
        let t = table().load();
        let pool = t.service("gateway").unwrap().pool(Color::Blue);
        for _ in 0..100 {
            assert_eq!(pool.pick(Some(0)), Some(1));
        }
        let green = t.service("gateway").unwrap().pool(Color::Green);
        assert_eq!(green.pick(Some(0)), None);
    }

    /// The pick weighs the in-flight counts of the endpoints it returns, in
    /// a table built from config and in one whose eligible set changed.
    #[test]
    fn pick_prefers_the_endpoint_with_fewer_in_flight() {
        let text = r#"
[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
hosts = ["*"]
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"] }
green = { endpoints = ["127.0.0.1:9001"] }
"#;
        let t = Table::new(&Config::parse(text).unwrap(), Metrics::new()).unwrap();
        let blue = |t: &Table| {
            t.load()
                .service("gateway")
                .unwrap()
                .pool(Color::Blue)
                .clone()
        };
        let pool = blue(&t);
        // Endpoint 1 busy: of any two drawn, the other one wins whenever 1
        // is drawn, so it is never picked.
        for _ in 0..5 {
            pool.endpoints[1].upstream.in_flight_inc();
        }
        for _ in 0..200 {
            assert_ne!(pool.pick(None), Some(1));
        }
        // Endpoint 0 drained: 1 and 2 are left and 2 (idle) always wins.
        t.apply(
            Command::SetDrained {
                service: "gateway".into(),
                addr: "127.0.0.1:8001".parse().unwrap(),
                drained: true,
            }
            .into(),
        )
        .unwrap();
        let pool = blue(&t);
        for _ in 0..200 {
            assert_eq!(pool.pick(None), Some(2));
        }
        // Load moved to 2: now 1 wins.
        for _ in 0..10 {
            pool.endpoints[2].upstream.in_flight_inc();
        }
        for _ in 0..200 {
            assert_eq!(pool.pick(None), Some(1));
        }
    }

    /// The gauges a change publishes go through handles resolved when the
    /// service or endpoint first appeared: they must still follow every
    /// change, and a reload must give a new endpoint its own series and keep
    /// a surviving one on the same series.
    #[test]
    fn gauges_follow_changes_and_reloads() {
        let t = table();
        let m = t.metrics().clone();
        let share = || m.candidate_share.with_label_values(&["gateway"]).get();
        let stable = |c: Color| {
            m.stable_color
                .with_label_values(&["gateway", c.as_str()])
                .get()
        };
        let up = |c: Color, a: &str| {
            m.endpoint_up
                .with_label_values(&["gateway", c.as_str(), a])
                .get()
        };
        let step = || m.rollout_step.with_label_values(&["gateway"]).get();
        assert_eq!(share(), 0.1);
        assert_eq!((stable(Color::Blue), stable(Color::Green)), (1, 0));
        assert_eq!(up(Color::Blue, "127.0.0.1:8002"), 1);
        assert_eq!(step(), -1);

        let apply = |cmd: Command| t.apply(cmd.into()).unwrap();
        apply(Command::SetSplit {
            service: "gateway".into(),
            candidate_bp: 2500,
        });
        assert_eq!(share(), 0.25);
        apply(Command::SetHealth {
            service: "gateway".into(),
            color: Color::Blue,
            addr: "127.0.0.1:8002".parse().unwrap(),
            healthy: false,
        });
        assert_eq!(up(Color::Blue, "127.0.0.1:8002"), 0);
        assert_eq!(up(Color::Blue, "127.0.0.1:8001"), 1);
        apply(Command::RolloutStart {
            service: "gateway".into(),
            steps: vec![5000, 10000],
            at_ms: 0,
        });
        assert_eq!((step(), share()), (0, 0.5));
        apply(Command::Promote {
            service: "gateway".into(),
        });
        assert_eq!((stable(Color::Blue), stable(Color::Green)), (0, 1));
        // The other services' gauges are theirs alone.
        assert_eq!(m.candidate_share.with_label_values(&["api"]).get(), 0.0);

        // A reload: 8002 leaves blue, 8003 joins; the live state is kept.
        let cfg = Config::parse(
            r#"
[[listener]]
name = "public"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8003"] }
green = { endpoints = ["127.0.0.1:9001"] }

[[service]]
name = "new"
hosts = ["new.example.com"]
candidate_percent = 40
blue  = { endpoints = ["127.0.0.1:8301"] }
green = { endpoints = ["127.0.0.1:9301"] }
"#,
        )
        .unwrap();
        t.replace_config(&cfg, "test").unwrap();
        assert_eq!(up(Color::Blue, "127.0.0.1:8003"), 1);
        assert_eq!(stable(Color::Green), 1, "the promoted color stays stable");
        assert_eq!(m.candidate_share.with_label_values(&["new"]).get(), 0.4);
        apply(Command::SetDrained {
            service: "gateway".into(),
            addr: "127.0.0.1:8001".parse().unwrap(),
            drained: true,
        });
        assert_eq!(up(Color::Blue, "127.0.0.1:8001"), 0);
        assert_eq!(
            m.table_generation.get() as u64,
            t.load().generation,
            "the generation gauge follows the table"
        );
    }
}
