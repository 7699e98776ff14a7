//! HTTP/1.1 keep-alive connections that hold no buffers while idle.
//!
//! hyper keeps a connection's read buffer (8–16 KiB), write buffer (8 KiB)
//! and a slot the size of the request future (~10 KiB) for as long as the
//! connection lives, idle or not. With thousands of idle keep-alive clients
//! that is most of a proxy's memory (28 KiB per idle connection, measured),
//! where HAProxy, which releases its buffers between requests, spends ~1 KiB.
//!
//! cyan does what HAProxy does: each *busy period* of a connection gets its
//! own hyper connection, and between requests only the socket is kept.
//!
//! ```text
//! wait until readable (no buffers) ─► hyper h1 over Watched<Rewind<socket>>
//!        ▲                               │ serves requests while they come
//!        └── take the socket back ◄──────┘ when hyper is provably idle
//! ```
//!
//! "Provably idle" is decided from [`IdleProbe`], which the [`Watched`]
//! socket and the request accounting update (atomics, no locks):
//!
//! * hyper's last read of the socket found nothing (`Pending`),
//! * everything hyper wrote has been flushed,
//! * no request is in flight and every request body was read to its end
//!   (an unread body would otherwise be parsed as the next request),
//! * a request finished after the last bytes were read, so hyper is past the
//!   end of a message and waiting for the next head,
//! * no protocol upgrade was requested on the connection.
//!
//! Bytes hyper had already read but not parsed (a pipelined request) come
//! back with the socket in hyper's `read_buf` and are replayed first by
//! [`Rewind`], so nothing a client sent is lost. When any condition does not
//! hold, hyper simply keeps the connection, as it would without this module.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the connection loop needs to know to take a socket back from hyper.
/// Written by the [`Watched`] socket and by request accounting, read by the
/// connection's own task after each poll of hyper.
#[derive(Debug, Default)]
pub struct IdleProbe {
    /// hyper's last read of the socket returned `Pending`.
    read_pending: AtomicBool,
    /// Bytes were written since the last completed flush.
    write_dirty: AtomicBool,
    /// Requests finished (response sent or abandoned) on this connection.
    finished: AtomicU64,
    /// `finished` as it was when bytes were last read.
    finished_at_read: AtomicU64,
    /// Request bodies handed to the proxy and not yet read to their end.
    /// A body left unread (answered without it, or cut short) never ends:
    /// hyper then keeps the connection for the rest of its life, which
    /// costs its buffers but can never parse body bytes as a request.
    bodies_open: AtomicU32,
    /// A protocol upgrade was requested: the socket stays with hyper.
    pinned: AtomicBool,
}

impl IdleProbe {
    pub fn request_finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    pub fn body_opened(&self) {
        self.bodies_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn body_ended(&self) {
        self.bodies_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Keeps the socket with hyper for the rest of the connection.
    pub fn pin(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }

    /// Whether hyper is between requests with nothing buffered to write.
    /// `in_flight` is the connection's count of requests being served.
    pub fn releasable(&self, in_flight: u32) -> bool {
        in_flight == 0
            && self.read_pending.load(Ordering::Relaxed)
            && !self.write_dirty.load(Ordering::Relaxed)
            && self.bodies_open.load(Ordering::Relaxed) == 0
            && !self.pinned.load(Ordering::Relaxed)
            && self.finished.load(Ordering::Relaxed) > self.finished_at_read.load(Ordering::Relaxed)
    }

    /// A new hyper connection starts on the socket.
    pub fn begin(&self) {
        self.read_pending.store(false, Ordering::Relaxed);
        self.write_dirty.store(false, Ordering::Relaxed);
        self.finished_at_read
            .store(self.finished.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A socket that can wait for readability without reading (so no buffer is
/// held while a keep-alive connection is idle).
pub trait WaitReadable {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl WaitReadable for TcpStream {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.readable()
    }
}

impl<T: WaitReadable> WaitReadable for tokio_rustls::server::TlsStream<T> {
    /// rustls only returns `Pending` from a read when it holds no decrypted
    /// bytes, so the socket is the one thing left to wait on.
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.get_ref().0.wait_readable()
    }
}

/// A socket with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(inner: T, pre: Bytes) -> Rewind<T> {
        Rewind { pre, inner }
    }

    /// The socket and the bytes not yet replayed.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.pre)
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The socket as hyper sees it: every read and write is noted in the
/// connection's [`IdleProbe`].
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    probe: Arc<IdleProbe>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, probe: Arc<IdleProbe>) -> Watched<T> {
        probe.begin();
        Watched { inner, probe }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let p = &self.probe;
        match &r {
            Poll::Pending => p.read_pending.store(true, Ordering::Relaxed),
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                p.read_pending.store(false, Ordering::Relaxed);
                p.finished_at_read
                    .store(p.finished.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            // End of stream or an error: hyper ends the connection itself.
            Poll::Ready(_) => p.read_pending.store(false, Ordering::Relaxed),
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.probe.write_dirty.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.probe.write_dirty.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            self.probe.write_dirty.store(false, Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Which protocol a client speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
}

/// Reads just enough of a new connection to tell an HTTP/2 preface from an
/// HTTP/1.1 request (as hyper-util's auto builder does). The bytes read are
/// returned to be replayed. `Ok(None)`: the client closed before sending
/// anything.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Option<(Sniffed, Bytes)>> {
    let mut buf = [0u8; 24];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            break;
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok(Some((
                Sniffed::Http1,
                Bytes::copy_from_slice(&buf[..filled]),
            )));
        }
    }
    let proto = if buf[..filled] == H2_PREFACE[..] {
        Sniffed::Http2
    } else {
        Sniffed::Http1
    };
    Ok(Some((proto, Bytes::copy_from_slice(&buf[..filled]))))
}

/// Joins hyper's unparsed bytes and what [`Rewind`] had not yet replayed
/// (hyper's bytes were read first, so they come first). Always a fresh
/// allocation or none: an empty `Bytes` frozen from hyper's read buffer
/// would keep the whole buffer alive through the idle wait.
pub fn leftover(hyper_buf: Bytes, rewind_rest: Bytes) -> Bytes {
    match (hyper_buf.is_empty(), rewind_rest.is_empty()) {
        (true, true) => Bytes::new(),
        (false, true) => Bytes::copy_from_slice(&hyper_buf),
        (true, false) => rewind_rest,
        (false, false) => {
            let mut b = BytesMut::with_capacity(hyper_buf.len() + rewind_rest.len());
            b.extend_from_slice(&hyper_buf);
            b.extend_from_slice(&rewind_rest);
            b.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_tells_h2_preface_from_h1() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, H2_PREFACE)
            .await
            .unwrap();
        let (p, pre) = sniff(&mut b).await.unwrap().unwrap();
        assert_eq!(p, Sniffed::Http2);
        assert_eq!(&pre[..], &H2_PREFACE[..]);

        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"POST / HTTP/1.1\r\n")
            .await
            .unwrap();
        let (p, pre) = sniff(&mut b).await.unwrap().unwrap();
        assert_eq!(p, Sniffed::Http1);
        // Decided at the first byte that differs from the preface; those
        // bytes are replayed, the rest stay in the socket.
        assert!(b"POST / HTTP/1.1\r\n".starts_with(&pre));
        assert!(!pre.is_empty());

        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(sniff(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_the_socket() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(b, Bytes::from_static(b"hello"));
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn releasable_needs_every_condition() {
        let p = IdleProbe::default();
        p.begin();
        assert!(!p.releasable(0), "no request finished yet");
        p.read_pending.store(true, Ordering::Relaxed);
        p.request_finished();
        assert!(p.releasable(0));
        assert!(!p.releasable(1), "a request in flight");
        p.body_opened();
        assert!(!p.releasable(0), "a body not read to its end");
        p.body_ended();
        p.write_dirty.store(true, Ordering::Relaxed);
        assert!(!p.releasable(0), "unflushed writes");
        p.write_dirty.store(false, Ordering::Relaxed);
        // Bytes read after the last request finished: hyper is mid-head.
        p.finished_at_read
            .store(p.finished.load(Ordering::Relaxed), Ordering::Relaxed);
        assert!(!p.releasable(0));
        p.request_finished();
        assert!(p.releasable(0));
        p.pin();
        assert!(!p.releasable(0), "an upgrade keeps the socket with hyper");
    }

    #[test]
    fn leftover_keeps_order() {
        assert_eq!(
            &leftover(Bytes::from_static(b"ab"), Bytes::from_static(b"cd"))[..],
            b"abcd"
        );
        assert_eq!(
            &leftover(Bytes::new(), Bytes::from_static(b"cd"))[..],
            b"cd"
        );
        assert_eq!(
            &leftover(Bytes::from_static(b"ab"), Bytes::new())[..],
            b"ab"
        );
    }
}
