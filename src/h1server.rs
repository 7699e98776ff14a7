//! cyan's own HTTP/1.1 server path for the common request: a bodiless GET
//! or HEAD whose head arrives whole.
//!
//! hyper's server runs a dispatcher per connection that parses into its own
//! buffers, moves the request future into a slot, and writes through its own
//! queue; on a proxied keep-alive request it was ~38 % of cyan's user-space
//! instructions (callgrind, `benches/README.md` "Profile"). Here the
//! connection's task reads the head, parses it with httparse into the
//! `http` request types with the headers kept as the head's lines (offsets
//! into the one read buffer, no `HeaderMap`: the request path reads and
//! rewrites them through [`crate::headers::Fields`], and cyan's own client
//! writes them on as they came), calls [`crate::proxy::handle`] as the hyper
//! path does, and writes the answer itself: the head and the first body
//! bytes in one write when they are there together.
//!
//! The path is narrow on purpose, and a request outside it goes to hyper
//! with every byte read so far ([`crate::keepalive::Rewind`]), so nothing
//! about it changes:
//!
//! * HTTP/1.1, GET or HEAD, an origin-form target that parses as a URI;
//! * no body: no `Content-Length` (other than `0`), no `Transfer-Encoding`;
//! * no `Upgrade`, no `Expect`, and `Connection` at most `keep-alive`;
//! * the whole head in the first read (1 KiB: a buffer glibc hands out from
//!   its per-thread cache), at most 100 headers.
//!
//! Everything cyan checks about a request ([`crate::headers::check_request`])
//! is checked the same way on both paths, since both end in the same
//! handler. What differs is only who frames the bytes: an answer with a
//! known length goes out with `Content-Length`, any other as chunked; HEAD,
//! 204 and 304 answers carry no body; a body that fails mid-way closes the
//! connection (the client sees the answer cut short, as with hyper).

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::body::RespBody;

/// The most request headers taken on this path (hyper's default too; a
/// request with more goes to hyper, which refuses it).
const MAX_HEADERS: usize = 100;

/// The first read of a request; a head that does not fit goes to hyper.
pub const READ_BYTES: usize = 1024;

/// Output is written once this much is waiting.
const WRITE_CHUNK: usize = 16 * 1024;

/// A request head this path takes, and the bytes after it (a pipelined
/// next request).
#[derive(Debug)]
pub struct Parsed {
    /// Method, target and version; the header map is left empty.
    pub parts: http::request::Parts,
    /// The headers, as the head's lines: the request path reads and
    /// rewrites them in place ([`crate::headers::Fields`]), and cyan's own
    /// client writes them on as they came. No `HeaderMap` is built unless
    /// the request goes to hyper's client.
    pub head: crate::h1client::RawHead,
    pub rest: Bytes,
}

/// Parses the head at the front of `buf`. The bytes come back (frozen,
/// untouched) when the request is not for this path, or incomplete, or
/// malformed: hyper then answers it.
pub fn parse(buf: BytesMut) -> Result<Parsed, Bytes> {
    let bytes = buf.freeze();
    match build(&bytes) {
        Some((parts, lines, len)) => Ok(Parsed {
            parts,
            head: crate::h1client::RawHead::request(bytes.slice(..len), lines),
            rest: bytes.slice(len..),
        }),
        None => Err(bytes),
    }
}

/// The request's parts (the target a slice of `bytes`, not a copy), its
/// header lines as offsets into `bytes`, and the head's length, if this
/// path takes it.
fn build(bytes: &Bytes) -> Option<(http::request::Parts, Vec<[u32; 4]>, usize)> {
    // Uninitialized: zeroing 100 headers cost more than parsing a head.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(bytes, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let method = match req.method? {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return None,
    };
    let path = req.path.filter(|p| p.starts_with('/'))?;
    let uri = Uri::from_maybe_shared(bytes.slice_ref(path.as_bytes())).ok()?;
    let base = bytes.as_ptr() as usize;
    let mut lines = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let refused = if name.eq_ignore_ascii_case(b"content-length") {
            h.value != b"0"
        } else {
            name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
                || (name.eq_ignore_ascii_case(b"connection")
                    && !h.value.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
        };
        if refused {
            return None;
        }
        // httparse takes what a `HeaderName` and a `HeaderValue` take, but
        // for a name's length, which a `HeaderName` bounds; such a request
        // goes to hyper, which refuses it.
        if name.len() > crate::h1client::MAX_NAME_BYTES {
            return None;
        }
        // Slices of `bytes`: the offsets are exact, and below 2^24 (the
        // head is at most `READ_BYTES`).
        let n0 = name.as_ptr() as usize - base;
        let v0 = h.value.as_ptr() as usize - base;
        lines.push([
            n0 as u32,
            (n0 + name.len()) as u32,
            v0 as u32,
            (v0 + h.value.len()) as u32,
        ]);
    }
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Some((parts, lines, len))
}

/// How writing an answer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Whole, and the connection may serve the next request.
    KeepAlive,
    /// Whole, and the connection is to close (`Connection: close`).
    Close,
    /// The client stopped reading for `send_timeout`: reset it.
    Stalled,
    /// The body or the socket failed mid-way: close.
    Broken,
}

/// Writes `resp` to the client. `close` asks for `Connection: close`.
pub async fn write_response<IO>(
    io: &mut IO,
    resp: Response<RespBody>,
    head_request: bool,
    mut close: bool,
    send_timeout: Duration,
) -> Written
where
    IO: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    if let Some(c) = parts.headers.get(header::CONNECTION) {
        if c.as_bytes().eq_ignore_ascii_case(b"close") {
            close = true;
        }
    }
    let status = parts.status;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();
    let chunked = !no_body && length.is_none();
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // An answer read by cyan's own client: its lines that go on, as they
    // came (`RawHead`), but for the framing this writer sets itself; then
    // what cyan set on the lines (`RawHead::set`, which marked out the lines
    // it replaces; its map stays empty). Hop-by-hop lines (Connection,
    // Transfer-Encoding among them) were marked out when the head was read.
    let mut date_sent = false;
    if let Some(raw) = body.raw_head() {
        debug_assert!(
            parts.headers.is_empty(),
            "cyan sets a raw answer's headers on its lines"
        );
        for (name, value) in raw.forwarded() {
            if !no_body && crate::headers::name_eq_lower(name, b"content-length") {
                continue;
            }
            date_sent |= crate::headers::name_eq_lower(name, b"date");
            header_line(&mut out, name, value);
        }
        if raw.te_trailers() {
            out.extend_from_slice(b"te: trailers\r\n");
        }
        for (name, value) in raw.own() {
            header_line(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in &parts.headers {
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && !no_body)
        {
            continue;
        }
        header_line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !date_sent && !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    if let (false, Some(n)) = (no_body, length) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(n, &mut [0u8; 20]));
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        drop(body);
        return finish(io, &out, close, send_timeout).await;
    }
    loop {
        // The head and the first bytes of the body go in one write when the
        // body has them now; otherwise what is waiting is written first.
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(f) => Poll::Ready(Some(f)),
        })
        .await;
        match next {
            None => {
                if let Err(w) = write_timed(io, &out, send_timeout).await {
                    return w;
                }
                out.clear();
            }
            Some(None) => break,
            Some(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed");
                let _ = write_timed(io, &out, send_timeout).await;
                return Written::Broken;
            }
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: not sent to an HTTP/1.1 client
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let mut hex = [0u8; 16];
                    out.extend_from_slice(hex_len(data.len(), &mut hex));
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(&data);
                }
                if out.len() >= WRITE_CHUNK {
                    if let Err(w) = write_timed(io, &out, send_timeout).await {
                        return w;
                    }
                    out.clear();
                }
            }
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    drop(body);
    finish(io, &out, close, send_timeout).await
}

/// Appends `name: value` and its CRLF.
#[inline]
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

async fn finish<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    out: &[u8],
    close: bool,
    send_timeout: Duration,
) -> Written {
    if let Err(w) = write_timed(io, out, send_timeout).await {
        return w;
    }
    if close {
        let _ = tokio::time::timeout(send_timeout, io.shutdown()).await;
        Written::Close
    } else {
        Written::KeepAlive
    }
}

/// Writes `data` whole. No timer while the socket takes the bytes at once;
/// once it is full, the rest must go within `limit`.
async fn write_timed<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    mut data: &[u8],
    limit: Duration,
) -> Result<(), Written> {
    while !data.is_empty() {
        let r = std::future::poll_fn(|cx| match Pin::new(&mut *io).poll_write(cx, data) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(r) => Poll::Ready(Some(r)),
        })
        .await;
        match r {
            Some(Ok(0)) | Some(Err(_)) => return Err(Written::Broken),
            Some(Ok(n)) => data = &data[n..],
            None => break,
        }
    }
    if data.is_empty() {
        return flush_timed(io, limit).await;
    }
    match tokio::time::timeout(limit, io.write_all(data)).await {
        Err(_) => Err(Written::Stalled),
        Ok(Err(_)) => Err(Written::Broken),
        Ok(Ok(())) => flush_timed(io, limit).await,
    }
}

async fn flush_timed<IO: AsyncWrite + Unpin>(io: &mut IO, limit: Duration) -> Result<(), Written> {
    // Tried once first: flushing a socket is done at once, and a timer
    // costs a clock read to set.
    let first = std::future::poll_fn(|cx| match Pin::new(&mut *io).poll_flush(cx) {
        Poll::Pending => Poll::Ready(None),
        Poll::Ready(r) => Poll::Ready(Some(r)),
    })
    .await;
    match first {
        Some(Ok(())) => return Ok(()),
        Some(Err(_)) => return Err(Written::Broken),
        None => {}
    }
    match tokio::time::timeout(limit, io.flush()).await {
        Err(_) => Err(Written::Stalled),
        Ok(Err(_)) => Err(Written::Broken),
        Ok(Ok(())) => Ok(()),
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Calls `f` with the current HTTP date, formatted once per second per
/// thread (as hyper does).
fn date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        f(d.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &[u8]) -> Option<Parsed> {
        parse(BytesMut::from(head)).ok()
    }

    #[test]
    fn takes_plain_gets_and_heads_with_their_headers() {
        let p = parsed(
            b"GET /a/b?c=1 HTTP/1.1\r\nHost: example\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        )
        .unwrap();
        assert_eq!(p.parts.method, Method::GET);
        assert_eq!(p.parts.uri, "/a/b?c=1");
        use crate::headers::Fields;
        assert!(p.parts.headers.is_empty(), "the headers are held as lines");
        assert_eq!(p.head.first(&header::HOST), Some(&b"example"[..]));
        let x_two = header::HeaderName::from_static("x-two");
        let twos: Vec<_> = p.head.values(&x_two).collect();
        assert_eq!(twos, [b"1", b"2"]);
        assert_eq!(&p.rest[..], b"GET /next", "a pipelined request stays");
        let p = parsed(
            b"HEAD / HTTP/1.1\r\nhost: x\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(p.parts.method, Method::HEAD);
    }

    #[test]
    fn leaves_everything_else_to_hyper_untouched() {
        for head in [
            &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx"[..],
            b"GET / HTTP/1.0\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
            b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nhost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\n",
            b"GET / HTTP/1.1\r\nho st: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: x\r\n folded\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\nhost: x\r\n\r\n",
        ] {
            match parse(BytesMut::from(head)) {
                Ok(p) => panic!("{:?} was taken: {p:?}", String::from_utf8_lossy(head)),
                Err(back) => assert_eq!(&back[..], head, "bytes given back whole"),
            }
        }
        let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n");
        assert!(parsed(head.as_bytes()).is_none());
    }

    #[test]
    fn number_formatting() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(1234567890123, &mut [0; 20]), b"1234567890123");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
        assert_eq!(hex_len(0, &mut [0; 16]), b"0");
        assert_eq!(hex_len(16384, &mut [0; 16]), b"4000");
        assert_eq!(hex_len(255, &mut [0; 16]), b"ff");
        date(|d| assert_eq!(d.len(), 29, "{}", String::from_utf8_lossy(d)));
    }
}
