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
//! # Two ways to start
//!
//! * `--upgrade` (= `--upgrade=required`): a predecessor must answer; if
//!   none does, or the hand-over fails, the new process exits 1 and nothing
//!   changed. For upgrades by hand.
//! * `--upgrade=auto`: take over when a predecessor answers, otherwise start
//!   normally (bind the sockets). "No predecessor" is decided by the
//!   connect(2) to the upgrade socket alone ([`no_predecessor`]): the file
//!   does not exist (`ENOENT`), or nothing listens on it (`ECONNREFUSED`: a
//!   file left by a process that exited or crashed; a draining process has
//!   closed it too). Any other error — permission denied, a predecessor
//!   that answered but whose hand-over failed, a timeout — stops the start
//!   (exit 1) and never falls back to binding: a fresh start beside a live
//!   cyan would fail on its ports anyway, and must not look like success.
//!   This is the mode of the systemd template unit.
//!
//! Under systemd (`Type=notify`) the process reports `READY=1` once it
//! serves (after telling its predecessor READY) and `STOPPING=1` when its
//! drain starts ([`notify_systemd`]), so `systemctl start` returns when the
//! new process serves and the old unit shows `deactivating` while it
//! drains.
//!
//! # Operator procedure with systemd (`deploy/systemd/cyan@.service`)
//!
//! Two instances of one template unit, `cyan@a` and `cyan@b`, share the
//! binary, `/etc/cyan/cyan.toml` (which must set
//! `upgrade_socket = "/run/cyan/upgrade.sock"`), `/var/lib/cyan` and
//! `/run/cyan`. Exactly one of them runs and is enabled; an upgrade starts
//! the other one, which takes the sockets over, and the old one drains and
//! exits 0, so its unit goes `inactive` with result `success` and is not
//! restarted (`Restart=on-failure`).
//!
//! ```sh
//! # first start
//! systemctl enable --now cyan@a
//! # which instance runs (and which binary version serves)
//! systemctl is-active cyan@a cyan@b; cyan ctl status | head -1
//! # upgrade (cyan@a runs): keep the running binary, install the new one,
//! # start the other instance; it returns once cyan@b serves
//! install -m 0755 /usr/local/bin/cyan /usr/local/bin/cyan.prev
//! install -m 0755 ./cyan /usr/local/bin/cyan
//! systemctl start cyan@b
//! systemctl enable cyan@b && systemctl disable cyan@a
//! # rollback: the same hand-over back to the previous binary
//! install -m 0755 /usr/local/bin/cyan.prev /usr/local/bin/cyan
//! systemctl start cyan@a
//! systemctl enable cyan@a && systemctl disable cyan@b
//! ```
//!
//! If the new process fails before it serves, `systemctl start` fails and
//! the old instance keeps serving (`systemctl stop cyan@b` ends the retries
//! of `Restart=on-failure`). Config changes stay `systemctl reload
//! cyan@X` (SIGHUP) on the running instance. README.md ("Upgrading cyan
//! itself") has the whole procedure.

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
/// on which to say READY. Any failure, "nobody runs" included, is an error
/// (`cyan run --upgrade`).
pub fn request(path: &Path) -> std::io::Result<(Inherited, UnixStream)> {
    let stream = UnixStream::connect(path).map_err(|e| unreachable_error(path, e))?;
    exchange(stream)
}

/// What [`request_if_running`] found.
#[derive(Debug)]
pub enum Takeover {
    /// A running cyan handed its sockets over: serve on them, then say
    /// [`ready`] on the stream.
    HandedOver(Inherited, UnixStream),
    /// No cyan runs on this upgrade socket (see [`no_predecessor`]); the
    /// connect error says which case.
    NoPredecessor(std::io::Error),
}

/// `cyan run --upgrade=auto`: like [`request`], except that "nobody runs"
/// ([`no_predecessor`]) is an answer, not an error. A predecessor that
/// accepted the connection but whose hand-over then failed is an error.
pub fn request_if_running(path: &Path) -> std::io::Result<Takeover> {
    match UnixStream::connect(path) {
        Ok(stream) => {
            let (inherited, stream) = exchange(stream)?;
            Ok(Takeover::HandedOver(inherited, stream))
        }
        Err(e) if no_predecessor(&e) => Ok(Takeover::NoPredecessor(e)),
        Err(e) => Err(unreachable_error(path, e)),
    }
}

/// Whether a failed connect(2) to the upgrade socket proves that no cyan
/// serves on it: the file does not exist (`ENOENT`, the directory neither),
/// or nothing listens on it (`ECONNREFUSED`: a stale socket file; Linux says
/// the same of a file that is no socket, which the normal start then
/// refuses to replace). Everything else (`EACCES`, a timeout, …) proves
/// nothing. A full backlog makes connect(2) wait, not fail. A live cyan
/// listens on its upgrade socket from the end of its start until its drain
/// begins. Before that window it already holds its ports (no SO_REUSEPORT),
/// so the normal start that follows fails (exit 1); after it, it is leaving
/// with its listening sockets closed, and a normal start is what is wanted.
pub fn no_predecessor(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn unreachable_error(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!("cannot reach the running cyan at {}: {e}", path.display()),
    )
}

/// The hand-over, on a connected upgrade socket.
fn exchange(stream: UnixStream) -> std::io::Result<(Inherited, UnixStream)> {
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
    if got.bytes == 0 && fds.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the running cyan closed the hand-over without sending its sockets",
        ));
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

/// Tells systemd about this process (`Type=notify`): `READY=1` once it
/// serves, `STOPPING=1` when its drain starts, `STATUS=…` for `systemctl
/// status`. Returns `Ok(false)` outside systemd (no `$NOTIFY_SOCKET`).
pub fn notify_systemd(state: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify(&socket, state).map(|_| true),
        None => Ok(false),
    }
}

/// One datagram to the notification socket: a path, or `@name` for an
/// abstract one.
fn notify(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => return Err(std::io::Error::other("abstract NOTIFY_SOCKET needs Linux")),
        None => {
            sock.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_or_dead_socket_means_no_predecessor() {
        let dir = std::env::temp_dir().join(format!("cyan-upgrade-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("upgrade.sock");
        let _ = std::fs::remove_file(&path);

        // No file.
        match request_if_running(&path).unwrap() {
            Takeover::NoPredecessor(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
        // A stale file: bound once, nobody listens any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        match request_if_running(&path).unwrap() {
            Takeover::NoPredecessor(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other:?}"),
        }
        // `--upgrade` stays strict.
        assert!(request(&path).is_err());

        // Something answers, then closes without handing anything over:
        // an error, never "nobody runs".
        std::fs::remove_file(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, HELLO);
        });
        let e = request_if_running(&path).unwrap_err();
        assert!(!no_predecessor(&e), "{e}");
        peer.join().unwrap();

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notify_sends_one_datagram() {
        let dir = std::env::temp_dir().join(format!("cyan-notify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        let name = format!("cyan-notify-unit-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let abstract_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        notify(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
