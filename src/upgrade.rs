//! Binary upgrade without refusing a connection: the listening sockets are
//! handed from the running cyan to its successor over a Unix socket
//! (`[runtime] upgrade_socket`, mode 0600), as file descriptors (SCM_RIGHTS).
//!
//! ```text
//! new: cyan run --config F --upgrade
//!   new ── "CYAN-UPGRADE 1" ──────────────────────────► old
//!   new ◄── names + fds (listeners, metrics, admin, upgrade socket) ── old
//!   new: restores state, starts serving on the same kernel sockets
//!   new ── "READY" ───────────────────────────────────► old
//!   old: readiness off, stops accepting, drains in-flight requests, exits 0
//! ```
//!
//! The sockets are never closed or re-bound, so the kernel's accept queue
//! keeps every connection through the hand-over: both processes accept for
//! a moment, then only the new one. If the new process dies before READY,
//! the old one simply keeps serving. The admin socket file is not removed by
//! the old process once it has handed the socket over.
//!
//! Operator procedure (systemd: `ExecReload` stays SIGHUP for config; an
//! upgrade is a new binary started with `--upgrade`, e.g. a oneshot unit, or
//! by hand): install the new binary, run `cyan run --config F --upgrade`,
//! watch the old PID exit 0.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

const HELLO: &str = "CYAN-UPGRADE 1\n";
const READY: &str = "READY\n";
/// More sockets than any sane config has.
const MAX_FDS: usize = 64;

/// Sockets received from the previous process, by name:
/// `listener:<name>`, `metrics`, `admin_unix`, `admin_tcp`, `upgrade`.
#[derive(Debug, Default)]
pub struct Inherited {
    pub fds: HashMap<String, OwnedFd>,
}

impl Inherited {
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.remove(name)
    }
}

/// Asks the running cyan for its sockets. Returns them and the connection
/// on which to say READY.
pub fn request(path: &Path) -> std::io::Result<(Inherited, UnixStream)> {
    let stream = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach the running cyan at {}: {e}", path.display()),
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(HELLO.as_bytes())?;
    let mut data = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut data)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let names: Vec<String> = serde_json::from_slice(data[..got.bytes].trim_ascii())
        .map_err(|e| std::io::Error::other(format!("bad hand-over message: {e}")))?;
    if names.len() != fds.len() {
        return Err(std::io::Error::other(format!(
            "hand-over sent {} names but {} sockets",
            names.len(),
            fds.len()
        )));
    }
    Ok((
        Inherited {
            fds: names.into_iter().zip(fds).collect(),
        },
        stream,
    ))
}

/// Tells the previous process that this one serves now.
pub fn ready(mut stream: UnixStream) -> std::io::Result<()> {
    stream.write_all(READY.as_bytes())
}

/// The old side: on a hand-over request, sends `sockets` and waits for
/// READY. Returns `Ok(true)` when the successor is ready (time to drain),
/// `Ok(false)` when it went away first (keep serving).
pub fn hand_over(
    stream: UnixStream,
    sockets: &[(String, BorrowedFd<'_>)],
) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line != HELLO {
        return Err(std::io::Error::other(format!(
            "unexpected hand-over request {line:?}"
        )));
    }
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
    let msg = serde_json::to_vec(&names).map_err(std::io::Error::other)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS || !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("too many sockets to hand over"));
    }
    sendmsg(
        stream.as_fd(),
        &[IoSlice::new(&msg)],
        &mut cmsg,
        SendFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    // The successor may take a while to restore state and start; READY or
    // nothing.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    line.clear();
    match reader.read_line(&mut line) {
        Ok(_) if line == READY => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(e),
    }
}
