//! The audit log and the persisted state, both in `[state] dir`.
//!
//! * `audit.jsonl`: one JSON object per committed change, append-only,
//!   `fdatasync`ed per line: `seq`, `time`, `actor`, `origin`, `action`,
//!   `service`, `before` → `after`, `generation`, `reason`, `command`. The
//!   newest events are also kept in memory for `GET /v1/events`.
//! * `state.json`: the dynamic part of the table (per service: stable color,
//!   candidate share, drained endpoints; the generation), rewritten
//!   atomically on every change: temp file, fsync, rename, fsync of the
//!   directory. On start it wins over the config's initial values.
//!
//! A state file that cannot be read or parsed stops the start with an error
//! naming it; `cyan run --fresh-state` starts from the config instead (and
//! overwrites the file on the first change). cyan never silently routes from
//! stale defaults.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::{bp_to_percent, Color};
use crate::table::{
    ChangeEvent, ChangeSink, Origin, RollbackLatch, RolloutState, RoutingTable, Service,
};

/// Events kept in memory for `/v1/events`.
const RECENT_EVENTS: usize = 10_000;
const STATE_FILE: &str = "state.json";
const AUDIT_FILE: &str = "audit.jsonl";

/// The dynamic state of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    pub stable: Color,
    pub candidate_bp: u16,
    #[serde(default)]
    pub drained: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RollbackLatch>,
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    pub version: u32,
    pub generation: u64,
    pub written_at: String,
    pub services: BTreeMap<String, ServiceState>,
}

impl PersistedState {
    pub fn of(table: &RoutingTable) -> PersistedState {
        PersistedState {
            version: 1,
            generation: table.generation,
            written_at: now_rfc3339(),
            services: table
                .services
                .iter()
                .map(|s| (s.name.to_string(), service_state(s)))
                .collect(),
        }
    }
}

fn service_state(s: &Service) -> ServiceState {
    ServiceState {
        stable: s.split.stable,
        candidate_bp: s.split.candidate_bp,
        drained: s
            .pools
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.drained)
            .map(|e| e.addr)
            .collect(),
        rollout: s.rollout.clone(),
        rolled_back: s.rolled_back.clone(),
    }
}

/// A service's state as the audit log shows it (before / after).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    pub stable: Color,
    pub candidate_percent: f64,
    pub drained: Vec<SocketAddr>,
    pub down: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
}

fn snapshot(s: &Service) -> ServiceSnapshot {
    let st = service_state(s);
    ServiceSnapshot {
        stable: st.stable,
        candidate_percent: bp_to_percent(st.candidate_bp),
        drained: st.drained,
        rollout_step: st.rollout.as_ref().map(|r| r.step),
        rolled_back: st.rolled_back.as_ref().map(|l| l.reason.clone()),
        down: s
            .pools
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| !e.healthy)
            .map(|e| e.addr)
            .collect(),
    }
}

/// One audit log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub origin: Origin,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<ServiceSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<ServiceSnapshot>,
    pub generation: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state file {path} cannot be used: {reason}\n  cyan will not route from stale defaults; \
         fix or move the file, or start with `cyan run --fresh-state` to begin from the config \
         (the file is overwritten on the next change)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Inner {
    audit: Option<File>,
    next_seq: u64,
    recent: VecDeque<AuditEvent>,
    write_errors: u64,
}

/// Audit log + state file; a [`ChangeSink`] for the table.
#[derive(Debug)]
pub struct StateStore {
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl StateStore {
    /// Keeps events in memory only (no `[state] dir`).
    pub fn memory() -> StateStore {
        StateStore {
            dir: None,
            inner: Mutex::new(Inner {
                audit: None,
                next_seq: 1,
                recent: VecDeque::new(),
                write_errors: 0,
            }),
        }
    }

    /// Opens (creating, mode 0700) the state directory. Returns the persisted
    /// state unless `fresh` is set or there is none yet.
    pub fn open(
        dir: &Path,
        fresh: bool,
    ) -> Result<(StateStore, Option<PersistedState>), StateError> {
        create_private_dir(dir).map_err(|source| StateError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let state_path = dir.join(STATE_FILE);
        let state = if fresh {
            None
        } else {
            read_state(&state_path)?
        };
        let audit_path = dir.join(AUDIT_FILE);
        let audit_err = |source| StateError::Audit {
            path: audit_path.clone(),
            source,
        };
        let mut recent = VecDeque::new();
        let mut next_seq = 1;
        if let Ok(f) = File::open(&audit_path) {
            for line in BufReader::new(f).lines() {
                let line = line.map_err(audit_err)?;
                // A torn last line (crash mid-write) is skipped, not fatal.
                if let Ok(ev) = serde_json::from_str::<AuditEvent>(&line) {
                    next_seq = next_seq.max(ev.seq + 1);
                    if recent.len() == RECENT_EVENTS {
                        recent.pop_front();
                    }
                    recent.push_back(ev);
                }
            }
        }
        let audit = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&audit_path)
            .map_err(audit_err)?;
        let store = StateStore {
            dir: Some(dir.to_path_buf()),
            inner: Mutex::new(Inner {
                audit: Some(audit),
                next_seq,
                recent,
                write_errors: 0,
            }),
        };
        Ok((store, state))
    }

    /// Audit events with `seq > since`, oldest first, at most `limit`.
    pub fn events_since(&self, since: u64, limit: usize) -> Vec<AuditEvent> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .recent
            .iter()
            .filter(|e| e.seq > since)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Failed state or audit writes since start.
    pub fn write_errors(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_errors
    }

    /// Writes `state.json` for `table` now (used at start so the file and
    /// the live table agree from the first moment).
    pub fn persist(&self, table: &RoutingTable) -> std::io::Result<()> {
        match &self.dir {
            Some(dir) => write_atomic(dir, STATE_FILE, &PersistedState::of(table)),
            None => Ok(()),
        }
    }
}

fn append(inner: &mut Inner, ev: AuditEvent) {
    inner.next_seq = ev.seq + 1;
    if let Some(f) = inner.audit.as_mut() {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = f.write_all(&line).and_then(|_| f.sync_data()) {
            inner.write_errors += 1;
            tracing::error!(error = %e, "cannot append to the audit log");
        }
    }
    if inner.recent.len() == RECENT_EVENTS {
        inner.recent.pop_front();
    }
    inner.recent.push_back(ev);
}

impl ChangeSink for StateStore {
    fn note(
        &self,
        origin: Origin,
        actor: &str,
        action: &str,
        service: Option<&str>,
        generation: u64,
        reason: Option<String>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ev = AuditEvent {
            seq: inner.next_seq,
            time: now_rfc3339(),
            actor: actor.to_string(),
            origin,
            action: action.to_string(),
            service: service.map(str::to_string),
            before: None,
            after: None,
            generation,
            reason,
            command: None,
        };
        append(&mut inner, ev);
    }

    fn committed(&self, event: &ChangeEvent<'_>) {
        let service = event.command.map(|c| c.service().to_string());
        let (before, after) = match &service {
            Some(name) => (
                event.before.service(name).map(snapshot),
                event.after.service(name).map(snapshot),
            ),
            None => (None, None),
        };
        let action = event.command.map_or("reload", |c| c.action());
        tracing::info!(
            target: "cyan::audit",
            actor = event.actor,
            origin = ?event.origin,
            action,
            service = service.as_deref().unwrap_or("-"),
            generation = event.after.generation,
            reason = event.reason.unwrap_or(""),
            "table changed"
        );
        let ev = AuditEvent {
            seq: 0,
            time: now_rfc3339(),
            actor: event.actor.to_string(),
            origin: event.origin,
            action: action.to_string(),
            service,
            before,
            after,
            generation: event.after.generation,
            reason: event.reason.map(str::to_string),
            command: event.command.and_then(|c| serde_json::to_value(c).ok()),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ev = AuditEvent {
            seq: inner.next_seq,
            ..ev
        };
        if let Some(dir) = &self.dir {
            if let Err(e) = write_atomic(dir, STATE_FILE, &PersistedState::of(event.after)) {
                inner.write_errors += 1;
                tracing::error!(error = %e, dir = %dir.display(), "cannot write the state file; the live table moved but a restart would not resume it");
            }
        }
        append(&mut inner, ev);
    }
}

/// Applies persisted state to a freshly built table. Services or endpoints
/// the config no longer has are skipped, with a note for each.
pub fn restore(table: &mut RoutingTable, state: &PersistedState) -> Vec<String> {
    let mut notes = Vec::new();
    table.generation = state.generation + 1;
    for (name, st) in &state.services {
        let Some(svc) = table.services.iter_mut().find(|s| &*s.name == name) else {
            notes.push(format!(
                "service `{name}` is in the state file but not in the config: ignored"
            ));
            continue;
        };
        svc.split.stable = st.stable;
        svc.split.candidate_bp = st.candidate_bp.min(crate::split::BUCKETS);
        svc.rollout = st.rollout.clone();
        svc.rolled_back = st.rolled_back.clone();
        for c in [Color::Blue, Color::Green] {
            let pool = svc.pool_mut(c);
            for e in pool.endpoints.iter_mut() {
                e.drained = st.drained.contains(&e.addr);
            }
            pool.refresh();
        }
        for d in &st.drained {
            let known = svc
                .pools
                .iter()
                .any(|p| p.endpoints.iter().any(|e| e.addr == *d));
            if !known {
                notes.push(format!(
                    "drained endpoint {d} of `{name}` is no longer configured"
                ));
            }
        }
    }
    notes
}

fn read_state(path: &Path) -> Result<Option<PersistedState>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StateError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let state: PersistedState = serde_json::from_slice(&text).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if state.version != 1 {
        return Err(StateError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("unsupported version {}", state.version),
        });
    }
    Ok(Some(state))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// temp file → fsync → rename → fsync(dir).
fn write_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The current time as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::table::{Change, ChangeSink, Command, Table};
    use std::sync::Arc;

    fn config() -> Config {
        Config::parse(
            r#"
[[listener]]
name = "l"
listen = "127.0.0.1:0"
[[service]]
name = "gateway"
candidate_percent = 5
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"] }
green = { endpoints = ["127.0.0.1:9001"] }
"#,
        )
        .unwrap()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cyan-state-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn changes_are_audited_persisted_and_restored() {
        let dir = tmpdir("roundtrip");
        let (store, state) = StateStore::open(&dir, false).unwrap();
        assert!(state.is_none());
        let store = Arc::new(store);
        let metrics = Metrics::new();
        let table = Table::new(&config(), metrics.clone()).unwrap();
        table.set_sink(store.clone());
        let change = Change::new(
            Command::SetSplit {
                service: "gateway".into(),
                candidate_bp: 2500,
            },
            Origin::Operator,
            "uid:1000",
        )
        .reason(Some("step 3".into()));
        table.apply(change).unwrap();
        table
            .apply(Change::new(
                Command::SetDrained {
                    service: "gateway".into(),
                    addr: "127.0.0.1:8002".parse().unwrap(),
                    drained: true,
                },
                Origin::Operator,
                "uid:0",
            ))
            .unwrap();
        let events = store.events_since(0, 100);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].actor, "uid:1000");
        assert_eq!(events[0].reason.as_deref(), Some("step 3"));
        assert_eq!(events[0].before.as_ref().unwrap().candidate_percent, 5.0);
        assert_eq!(events[0].after.as_ref().unwrap().candidate_percent, 25.0);
        assert_eq!(events[1].action, "drain");
        assert_eq!(store.events_since(1, 100).len(), 1);

        // A restart: the file wins over the config's 5 %.
        drop(table);
        let (store2, state) = StateStore::open(&dir, false).unwrap();
        let state = state.expect("state persisted");
        assert_eq!(state.generation, 3);
        let mut rebuilt = RoutingTable::build(&config(), &metrics, None, 1).unwrap();
        assert!(restore(&mut rebuilt, &state).is_empty());
        let svc = rebuilt.service("gateway").unwrap();
        assert_eq!(svc.split.candidate_bp, 2500);
        assert_eq!(svc.pool(Color::Blue).eligible, vec![0]);
        assert_eq!(rebuilt.generation, 4);
        // The audit history survives too, and numbering continues.
        assert_eq!(store2.events_since(0, 100).len(), 2);
        store2.note(
            Origin::Config,
            "signal",
            "reload_rejected",
            None,
            4,
            Some("bad".into()),
        );
        assert_eq!(store2.events_since(2, 100)[0].seq, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_state_refuses_to_start_unless_fresh() {
        let dir = tmpdir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(STATE_FILE),
            b"{\"version\": 1, \"generation\": tru",
        )
        .unwrap();
        let err = StateStore::open(&dir, false).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        assert!(err.contains("--fresh-state"), "{err}");
        let (_, state) = StateStore::open(&dir, true).unwrap();
        assert!(state.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmpdir("mode");
        StateStore::open(&dir, false).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
