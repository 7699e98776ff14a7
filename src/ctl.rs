//! `cyan ctl`: the operator's client for the admin API.
//!
//! Exit codes: 0 ok, 1 error (including a refused request), 2 usage,
//! 3 conflict (stale `--if-generation`: nothing changed).

use std::fmt::Write as _;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Where the admin API is.
#[derive(Debug, Clone)]
pub enum Target {
    Socket(PathBuf),
    Url { base: String, token: String },
}

/// One operator action.
#[derive(Debug, Clone)]
pub enum Verb {
    Status,
    Split {
        service: String,
        percent: f64,
    },
    Promote {
        service: String,
    },
    Rollback {
        service: String,
    },
    Drain {
        service: String,
        addr: String,
    },
    Undrain {
        service: String,
        addr: String,
    },
    Events {
        since: u64,
    },
    Reload,
    /// `op` is start, pause, resume, abort or status.
    Rollout {
        op: String,
        service: String,
    },
}

/// Options shared by mutating verbs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub reason: Option<String>,
    pub if_generation: Option<u64>,
    pub json: bool,
}

/// Writes the answer to stdout in one go; false when it could not be
/// written. A reader that went away (`cyan ctl status | head -1`) is not an
/// error: the answer was delivered as far as anyone wanted it (`println!`
/// would panic on the broken pipe). Any other failure (a full disk) is.
fn emit(out: &str) -> bool {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("cyan ctl: cannot write the answer: {e}");
            false
        }
    }
}

/// One line of human output.
fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
    out.push('\n');
}

/// Exit codes.
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_CONFLICT: u8 = 3;

/// Runs a verb; prints the answer; returns the exit code.
pub async fn run(target: &Target, verb: &Verb, opts: &Options) -> u8 {
    let (method, path, body) = request_for(verb, opts);
    match call(target, method, &path, body).await {
        Err(e) => {
            eprintln!("cyan ctl: {e}");
            EXIT_ERROR
        }
        Ok((status, value)) => {
            let mut out = String::new();
            if opts.json {
                out = serde_json::to_string_pretty(&value).unwrap_or_default();
                out.push('\n');
            } else if status.is_success() {
                render_human(&mut out, verb, &value);
            }
            if !emit(&out) {
                return EXIT_ERROR;
            }
            if status.is_success() {
                EXIT_OK
            } else {
                if !opts.json {
                    let msg = value["error"].as_str().unwrap_or("request refused");
                    eprintln!("cyan ctl: {} {msg}", status.as_u16());
                }
                if status == StatusCode::CONFLICT {
                    EXIT_CONFLICT
                } else {
                    EXIT_ERROR
                }
            }
        }
    }
}

fn request_for(verb: &Verb, opts: &Options) -> (Method, String, Option<Value>) {
    let change = || {
        let mut b = json!({});
        if let Some(r) = &opts.reason {
            b["reason"] = json!(r);
        }
        if let Some(g) = opts.if_generation {
            b["if_generation"] = json!(g);
        }
        b
    };
    match verb {
        Verb::Status => (Method::GET, "/v1/status".into(), None),
        Verb::Events { since } => (Method::GET, format!("/v1/events?since={since}"), None),
        Verb::Reload => (Method::POST, "/v1/reload".into(), None),
        Verb::Rollout { op, service } if op == "status" => {
            (Method::GET, format!("/v1/services/{service}/rollout"), None)
        }
        Verb::Rollout { op, service } => (
            Method::POST,
            format!("/v1/services/{service}/rollout/{op}"),
            Some(change()),
        ),
        Verb::Split { service, percent } => {
            let mut b = change();
            b["candidate_percent"] = json!(percent);
            (
                Method::PUT,
                format!("/v1/services/{service}/split"),
                Some(b),
            )
        }
        Verb::Promote { service } => (
            Method::POST,
            format!("/v1/services/{service}/promote"),
            Some(change()),
        ),
        Verb::Rollback { service } => (
            Method::POST,
            format!("/v1/services/{service}/rollback"),
            Some(change()),
        ),
        Verb::Drain { service, addr } => (
            Method::POST,
            format!("/v1/services/{service}/endpoints/{addr}/drain"),
            Some(change()),
        ),
        Verb::Undrain { service, addr } => (
            Method::POST,
            format!("/v1/services/{service}/endpoints/{addr}/undrain"),
            Some(change()),
        ),
    }
}

/// Sends one request to the admin API.
pub async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let bytes = body
        .map(|b| serde_json::to_vec(&b).unwrap_or_default())
        .unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "cyan");
    if !bytes.is_empty() {
        req = req.header("content-type", "application/json");
    }
    match target {
        Target::Socket(p) => {
            let stream = tokio::net::UnixStream::connect(p).await.map_err(|e| {
                format!(
                    "cannot reach the admin socket {}: {e} (is cyan running, and may your user use the socket?)",
                    p.display()
                )
            })?;
            let req = req
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| e.to_string())?;
            exchange(stream, req).await
        }
        Target::Url { base, token } => {
            let url: http::Uri = base.parse().map_err(|e| format!("bad --url {base}: {e}"))?;
            if url.scheme_str() != Some("http") {
                return Err("--url must be http://HOST:PORT (the TCP admin listener)".into());
            }
            let authority = url
                .authority()
                .ok_or("--url needs host:port")?
                .as_str()
                .to_string();
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| format!("cannot reach {authority}: {e}"))?;
            let req = req
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| e.to_string())?;
            exchange(stream, req).await
        }
    }
}

async fn exchange<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<(StatusCode, Value), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("admin handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("admin request failed: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("admin response: {e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&body) }));
    Ok((status, value))
}

fn render_human(out: &mut String, verb: &Verb, v: &Value) {
    match verb {
        Verb::Status => render_status(out, v),
        Verb::Events { .. } => render_events(out, v),
        Verb::Reload => line(
            out,
            format_args!("reloaded: generation {}", v["generation"]),
        ),
        Verb::Rollout { op, .. } if op == "status" => render_rollout(out, v),
        _ => {
            let result = v["result"].as_str().unwrap_or("?");
            let what = if result == "no_change" {
                "no change"
            } else {
                "applied"
            };
            let _ = writeln!(out, "{what}: generation {}", v["generation"]);
            if v["service"].is_object() {
                render_services(out, std::slice::from_ref(&v["service"]));
            }
        }
    }
}

fn render_status(out: &mut String, v: &Value) {
    let _ = writeln!(
        out,
        "generation {}   cyan {}",
        v["generation"],
        v["version"].as_str().unwrap_or("")
    );
    let services = v["services"].as_array().cloned().unwrap_or_default();
    render_services(out, &services);
}

fn render_services(out: &mut String, services: &[Value]) {
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<20} {:<7} {:<10} {:>9}  {:<12} {:<12}",
        "SERVICE", "STABLE", "CANDIDATE", "CANDIDATE%", "BLUE", "GREEN"
    );
    for s in services {
        let pool_sum = |c: &str| {
            let eps = s["pools"][c]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            format!("{}/{} up", s["pools"][c]["eligible"], eps.len())
        };
        let _ = writeln!(
            out,
            "{:<20} {:<7} {:<10} {:>9.2}%  {:<12} {:<12}",
            s["name"].as_str().unwrap_or(""),
            s["stable"].as_str().unwrap_or(""),
            s["candidate"].as_str().unwrap_or(""),
            s["candidate_percent"].as_f64().unwrap_or(0.0),
            pool_sum("blue"),
            pool_sum("green"),
        );
        for c in ["blue", "green"] {
            for e in s["pools"][c]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let state = e["state"].as_str().unwrap_or("");
                let mark = if state == "up" { "" } else { "  <--" };
                let _ = writeln!(
                    out,
                    "    {:<6} {:<24} {:<8} in-flight {}{mark}",
                    c,
                    e["address"].as_str().unwrap_or(""),
                    state,
                    e["in_flight"]
                );
            }
        }
    }
}

fn render_rollout(out: &mut String, v: &Value) {
    let _ = writeln!(
        out,
        "{}: candidate at {:.2}%  (generation {})",
        v["service"].as_str().unwrap_or(""),
        v["candidate_percent"].as_f64().unwrap_or(0.0),
        v["generation"]
    );
    match &v["rollout"] {
        Value::Null => line(out, format_args!("no rollout running")),
        r => line(
            out,
            format_args!(
                "rollout: step {} of {} ({}%), held {:.0}s of {:.0}s{}",
                r["step"].as_u64().unwrap_or(0) + 1,
                r["steps"].as_array().map_or(0, |a| a.len()),
                r["percent"],
                r["held_seconds"].as_f64().unwrap_or(0.0),
                r["hold_seconds"].as_f64().unwrap_or(0.0),
                if r["paused"].as_bool() == Some(true) {
                    "  PAUSED"
                } else {
                    ""
                }
            ),
        ),
    }
    if let Some(reason) = v["rolled_back"]["reason"].as_str() {
        let _ = writeln!(
            out,
            "ROLLED BACK at {}: {reason}",
            v["rolled_back"]["at"].as_str().unwrap_or("")
        );
    }
    if let Some(plan) = v["plan"].as_object() {
        let _ = writeln!(
            out,
            "plan: steps {} hold {} ({} preflight checks)",
            plan["steps"], plan["hold"], plan["preflight_checks"]
        );
    }
}

fn render_events(out: &mut String, v: &Value) {
    let events = v["events"].as_array().cloned().unwrap_or_default();
    if events.is_empty() {
        let _ = writeln!(out, "no events");
        return;
    }
    for e in events {
        let change = match (&e["before"], &e["after"]) {
            (b, a) if b.is_object() && a.is_object() => format!(
                "{} {:.2}% -> {} {:.2}%",
                b["stable"].as_str().unwrap_or(""),
                b["candidate_percent"].as_f64().unwrap_or(0.0),
                a["stable"].as_str().unwrap_or(""),
                a["candidate_percent"].as_f64().unwrap_or(0.0)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "#{:<5} {}  gen {:<5} {:<9} {:<16} {:<12} {:<28} {}{}",
            e["seq"],
            e["time"].as_str().unwrap_or(""),
            e["generation"],
            e["origin"].as_str().unwrap_or(""),
            e["actor"].as_str().unwrap_or(""),
            e["action"].as_str().unwrap_or(""),
            e["service"].as_str().unwrap_or("-"),
            change,
            e["reason"]
                .as_str()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default(),
        );
    }
}
