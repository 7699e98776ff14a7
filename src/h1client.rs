//! cyan's own HTTP/1.1 client for the common exchange: a bodiless GET or
//! HEAD to a plaintext HTTP/1.1 endpoint.
//!
//! hyper's client runs every upstream connection as a task of its own and
//! hands each request to it over a channel; the response head and each body
//! chunk come back the same way. For a proxy that costs two task hand-offs
//! and their wake-ups per request, and it was ~32 % of cyan's user-space
//! instructions per proxied HTTP/1.1 request (callgrind, `benches/README.md`
//! "Profile"). Here the request's own task writes the head and reads the
//! answer: the connection is a plain socket with a read buffer, owned by the
//! request while it is in use and by the pool ([`crate::upstream`]) between
//! requests.
//!
//! The scope is deliberately narrow, and everything outside it still goes
//! through hyper:
//!
//! * only GET and HEAD, with no body (what a gateway mostly proxies, and
//!   where a request is nothing but its head);
//! * no upgrade, no upstream TLS, no HTTP/2.
//!
//! A pooled connection the endpoint closed while it sat idle is told apart
//! before it is used ([`RawConn::alive`]) without a read per request. A
//! request once written is never sent again: it may have reached the
//! endpoint (cyan's contract is that no request reaches two backends).
//!
//! Responses are read strictly (RFC 9112 §6.3): a head larger than
//! `read_buffer_bytes`, over 100 headers, an invalid or conflicting
//! `Content-Length` or malformed chunked framing is an error (502), never a
//! guess. Interim 1xx answers are skipped, as hyper does. A body framed by
//! the connection's close, `Connection: close`, an HTTP/1.0 answer without
//! keep-alive and bytes past the end of a response all keep the connection
//! out of the pool.
//!
//! A response head is kept as its lines ([`RawHead`]), not a `HeaderMap`:
//! the hop-by-hop ones are marked out when it is read, what cyan sets
//! replaces lines of the same name ([`RawHead::set`]), and cyan's own
//! HTTP/1.1 server writes the rest as they came; hyper's server gets a map
//! made of them ([`RawHead::append_to`], through `proxy::for_hyper`).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The most response headers accepted (hyper's default too).
const MAX_HEADERS: usize = 100;

/// The longest header name a `HeaderName` takes (http's limit).
pub(crate) const MAX_NAME_BYTES: usize = (1 << 16) - 1;

/// The longest chunk-size line (with its extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange on a raw connection failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("connection closed before a response (nothing read)")]
    ClosedEarly,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed mid-response")]
    Truncated,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

/// Whether `req` can take the raw path: GET or HEAD, no body, no upgrade.
pub fn eligible<B: Body>(req: &Request<B>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.body().is_end_stream()
        // Empty when the headers are held as lines: cyan's own server takes
        // none of the heads refused below.
        && (req.headers().is_empty() || eligible_headers(req.headers()))
}

fn eligible_headers(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::UPGRADE)
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// The request head as sent: origin-form target, HTTP/1.1, the headers as
/// they are: the map's (lower-case names, as hyper writes them), then
/// `lines` (names as the client wrote them).
pub fn encode_head<B>(req: &Request<B>, lines: Option<&RawHead>, out: &mut Vec<u8>) {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        crate::h1server::header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(l) = lines {
        l.write_lines(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// An upstream connection: the socket and what was read but not used.
#[derive(Debug)]
pub struct RawConn {
    io: TcpStream,
    buf: BytesMut,
    /// The response timer, kept with the connection and pushed back for
    /// each exchange ([`RawConn::take_timer`]).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304, `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

impl RawConn {
    pub fn new(io: TcpStream) -> RawConn {
        RawConn {
            io,
            buf: BytesMut::new(),
            timer: None,
        }
    }

    /// The connection's timer, due `after` from now; give it back with
    /// [`RawConn::keep_timer`]. One timer per connection, pushed back each
    /// exchange: a later deadline only moves a number (tokio extends a
    /// registered timer in place), where a timer per exchange was put in
    /// and taken out of the timer wheel every request. The cost: a pooled
    /// connection's timer stays armed while it idles and may fire once,
    /// waking the task of its last request for nothing.
    pub fn take_timer(&mut self, after: Duration) -> Pin<Box<tokio::time::Sleep>> {
        let at = tokio::time::Instant::now() + after;
        match self.timer.take() {
            Some(mut t) => {
                t.as_mut().reset(at);
                t
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        }
    }

    pub fn keep_timer(&mut self, timer: Pin<Box<tokio::time::Sleep>>) {
        self.timer = Some(timer);
    }

    /// Closes the socket with a reset (an abandoned exchange): nothing more
    /// is read, and no TIME_WAIT is left on cyan's side.
    pub fn reset(self) {
        let _ = socket2::SockRef::from(&self.io).set_linger(Some(Duration::ZERO));
    }

    /// Whether the endpoint has left the connection alone since its last
    /// answer. tokio clears a socket's read readiness after a read that did
    /// not fill its buffer (epoll), so readiness on an idle pooled socket
    /// means something came after the answer: a close, a reset or stray
    /// bytes. Only then is the socket read (once, without waiting) to tell;
    /// a socket still quiet costs no system call.
    pub fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Lets go of the read buffer's memory while the connection sits in
    /// the pool (it holds up to `read_buffer_bytes`).
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Writes a request head.
    pub async fn write(&mut self, head: &[u8]) -> io::Result<()> {
        self.io.write_all(head).await
    }

    /// Reads a response head (skipping interim 1xx answers); `limit` bounds
    /// the head's size. Returns the status and version, the header lines,
    /// its body's framing and whether the connection may be reused after
    /// the body.
    pub async fn read_head(
        &mut self,
        limit: usize,
        head_request: bool,
    ) -> Result<(http::response::Parts, RawHead, Framing, bool), RawError> {
        let mut got_any = false;
        loop {
            if !self.buf.is_empty() {
                got_any = true;
                match parse_head(&mut self.buf, head_request)? {
                    Some(Parsed::Interim) => continue,
                    Some(Parsed::Final(parts, raw, framing, reuse)) => {
                        return Ok((parts, raw, framing, reuse))
                    }
                    None if self.buf.len() >= limit => {
                        return Err(RawError::Invalid("response head too large"))
                    }
                    None => {}
                }
            }
            let n = std::future::poll_fn(|cx| fill(&mut self.io, &mut self.buf, limit, cx)).await;
            match n {
                Ok(0) if got_any => return Err(RawError::Truncated),
                Ok(0) => return Err(RawError::ClosedEarly),
                Ok(_) => {}
                Err(e) => return Err(RawError::Io(e)),
            }
        }
    }
}

/// Reads once into `buf`'s spare room, at most up to `limit` bytes held.
fn fill(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let room = limit.saturating_sub(buf.len()).max(1);
    if buf.capacity() - buf.len() < room {
        buf.reserve(room);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut (&mut *buf).limit(room))
}

// Not boxed: a head is parsed into it and taken apart at once, and a box
// would be one more allocation per response.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Interim,
    Final(http::response::Parts, RawHead, Framing, bool),
}

// Which lines go on is kept as bits of a u128.
const _: () = assert!(MAX_HEADERS <= 128);

/// A response head as cyan's own client read it: the head's bytes and where
/// each header line's name and value lie in them, with the hop-by-hop
/// lines marked out ([`crate::headers::hop_by_hop_lines`]). It is never put
/// into a `HeaderMap` on cyan's own HTTP/1.1 server path, which writes the
/// lines that go on as they came ([`crate::h1server::write_response`]);
/// hyper's server gets a map made from them ([`RawHead::append_to`]).
/// Building a map (names parsed and hashed, values sliced, the hop-by-hop
/// strip run on it) and writing from it again was ~3.5k instructions of a
/// proxied request (callgrind).
///
/// Kept small (80 bytes; `own` allocates only once cyan sets something): it
/// travels with the response through every move of it.
#[derive(Debug, Clone, Default)]
pub struct RawHead {
    head: Bytes,
    /// Name start and end, value start and end, per line; [`GOES_ON`] set
    /// in the name's end for a line that goes on.
    lines: Box<[[u32; 4]]>,
    /// `TE` lines listed `trailers`: `te: trailers` goes in their place.
    te_trailers: bool,
    /// Both `Transfer-Encoding` and `Content-Length` came (RFC 9112 §6.3):
    /// the response must not be forwarded.
    pub framed_twice: bool,
    /// What cyan sets on the response (a color header, `X-Request-Id`):
    /// each replaces the lines of its name ([`RawHead::set`]).
    own: Vec<(HeaderName, HeaderValue)>,
    /// Bit `n % 64` set when a line's name is `n` bytes long: a name of
    /// another length is looked up without reading a line (one AND). Most
    /// lookups are for names a head does not carry (`X-Forwarded-*`,
    /// `Cookie`, `X-Request-Id` on a request), and most of those differ in
    /// length from every name it does.
    lens: u64,
    /// Each of the first [`INDEXED`] lines' name length, one byte a line
    /// (255 for 255 and longer; 0 past the last line): the lines a name
    /// could be on are found by comparing all sixteen bytes at once
    /// ([`candidates`]), not by reading each line. A hint only: a candidate
    /// is checked against the line (it may have been marked out since).
    len_at: [u8; INDEXED],
}

/// The bit of [`RawHead::lens`] for names `n` bytes long.
#[inline]
fn len_bit(n: usize) -> u64 {
    1 << (n % 64)
}

/// How many lines [`RawHead::len_at`] indexes; the lines past them are
/// read one by one. Clients send 5-15 header lines; browsers up to ~20.
const INDEXED: usize = 16;

/// Notes line `i`'s name length in `len_at`, as [`RawHead::len_at`] keeps it.
#[inline]
fn index_len(len_at: &mut [u8; INDEXED], i: usize, name_len: usize) {
    if let Some(at) = len_at.get_mut(i) {
        *at = name_len.min(255) as u8;
    }
}

/// The indexed lines whose name could be `n` bytes long: bit `8 * i` set for
/// line `i`. Bytes equal to `n` are the zero bytes of `len_at ^ n`; a byte's
/// low seven bits plus 0x7f carries into its top bit only when they are
/// not all zero, and never into the next byte.
#[inline]
fn candidates(len_at: &[u8; INDEXED], n: usize) -> u128 {
    const LOW7: u128 = u128::from_le_bytes([0x7f; INDEXED]);
    const ONES: u128 = u128::from_le_bytes([0x01; INDEXED]);
    let x = u128::from_le_bytes(*len_at) ^ (n.min(255) as u128 * ONES);
    !(((x & LOW7) + LOW7) | x | LOW7) >> 7
}

/// In a line's name end: the line goes on. Offsets are below 2^24 (a head
/// is at most `read_buffer_bytes`, ≤ 16 MiB).
const GOES_ON: u32 = 1 << 31;

impl RawHead {
    /// A request head as cyan's own server read it ([`crate::h1server`]):
    /// `lines` are offsets into `head`, every line going on until
    /// [`FieldsMut::strip`](crate::headers::FieldsMut::strip) marks the
    /// hop-by-hop ones out.
    pub(crate) fn request(head: Bytes, lines: Vec<[u32; 4]>) -> RawHead {
        let mut lines = lines.into_boxed_slice();
        let (mut lens, mut len_at) = (0, [0; INDEXED]);
        for (i, l) in lines.iter_mut().enumerate() {
            let n = (l[1] - l[0]) as usize;
            lens |= len_bit(n);
            index_len(&mut len_at, i, n);
            l[1] |= GOES_ON;
        }
        RawHead {
            head,
            lines,
            lens,
            len_at,
            ..RawHead::default()
        }
    }

    /// The first value of `name` that goes on, as a `HeaderValue` sharing
    /// the head's bytes (or the one cyan set).
    pub fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        if let Some((_, v)) = self.own.iter().find(|(n, _)| n == name) {
            return Some(v.clone());
        }
        let v = self.get(name.as_str().as_bytes())?;
        HeaderValue::from_maybe_shared(self.head.slice_ref(v)).ok()
    }

    /// Writes the lines that go on, `te: trailers` if it goes in their
    /// place, then what cyan set, as HTTP/1.1 header lines.
    pub fn write_lines(&self, out: &mut Vec<u8>) {
        for (name, value) in self.forwarded() {
            crate::h1server::header_line(out, name, value);
        }
        if self.te_trailers {
            out.extend_from_slice(b"te: trailers\r\n");
        }
        for (name, value) in &self.own {
            crate::h1server::header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }

    /// The lines that go on (names as they came), in order: not
    /// hop-by-hop, and not replaced by what cyan set ([`RawHead::own`]).
    pub fn forwarded(&self) -> impl DoubleEndedIterator<Item = (&[u8], &[u8])> + '_ {
        self.lines
            .iter()
            .filter(|l| l[1] & GOES_ON != 0)
            .map(|&l| line_of(&self.head, l))
    }

    /// The lines that go on named `lower` (lowercase), in order.
    fn forwarded_named<'s>(
        &'s self,
        lower: &'s [u8],
    ) -> impl DoubleEndedIterator<Item = (&'s [u8], &'s [u8])> + 's {
        let lines = if self.lens & len_bit(lower.len()) == 0 {
            &self.lines[..0]
        } else {
            &self.lines[..]
        };
        lines
            .iter()
            .filter(|l| l[1] & GOES_ON != 0)
            .map(|&l| line_of(&self.head, l))
            .filter(move |(n, _)| n.eq_ignore_ascii_case(lower))
    }

    /// Sets a header: it replaces the lines of that name
    /// (marked out now, once) and an earlier value cyan set for it, as an
    /// insert into a map does.
    pub fn set(&mut self, name: HeaderName, value: HeaderValue) {
        self.mark_out(&name);
        match self.own.iter_mut().find(|(n, _)| *n == name) {
            Some(own) => own.1 = value,
            None => self.own.push((name, value)),
        }
    }

    /// Marks the lines named `name` out.
    #[inline]
    fn mark_out(&mut self, name: &HeaderName) {
        let lower = name.as_str().as_bytes();
        if self.lens & len_bit(lower.len()) == 0 {
            return;
        }
        for l in self.lines.iter_mut() {
            if l[1] & GOES_ON != 0 && line_of(&self.head, *l).0.eq_ignore_ascii_case(lower) {
                l[1] &= !GOES_ON;
            }
        }
    }

    /// What cyan set, in the order it was set.
    pub fn own(&self) -> &[(HeaderName, HeaderValue)] {
        &self.own
    }

    /// The first value of `name` (lowercase) among the lines that go on.
    pub fn get<'s>(&'s self, name: &'s [u8]) -> Option<&'s [u8]> {
        self.forwarded_named(name).next().map(|(_, v)| v)
    }

    /// [`Fields::first`](crate::headers::Fields::first) past the length
    /// index: the lines after the first [`INDEXED`], then what cyan set.
    /// Out of line, so that the indexed lookup saves fewer registers.
    #[inline(never)]
    fn first_unindexed<'s>(&'s self, name: &HeaderName, lower: &[u8]) -> Option<&'s [u8]> {
        if self.lens & len_bit(lower.len()) != 0 {
            for &[n0, n1, v0, v1] in self.lines.get(INDEXED..).unwrap_or_default() {
                // A line that goes on has `GOES_ON` in its name's end:
                // flipped off, the offsets give the name's length; a line
                // marked out gets the bit flipped on and never has it. The
                // length is read before any byte is.
                let end = n1 ^ GOES_ON;
                if end.wrapping_sub(n0) as usize == lower.len()
                    && crate::headers::name_eq_lower(&self.head[n0 as usize..end as usize], lower)
                {
                    return Some(&self.head[v0 as usize..v1 as usize]);
                }
            }
        }
        self.own
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes())
    }

    /// Whether a `te: trailers` line goes on in place of the `TE` lines.
    pub fn te_trailers(&self) -> bool {
        self.te_trailers
    }

    /// Puts the lines that go on, then what cyan set, into `map` (for
    /// hyper's server). What `map` already holds replaces lines of the same
    /// names too. A value is a slice of the head, not a copy; an echoed
    /// `X-Request-Id` is kept out of HPACK's table, as on the map path.
    pub fn append_to(self, map: &mut HeaderMap) {
        let held = std::mem::replace(
            map,
            HeaderMap::with_capacity(self.lines.len() + self.own.len() + map.len()),
        );
        for (name, value) in self.forwarded() {
            if held
                .keys()
                .any(|k| k.as_str().as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            // Checked when the head was read (`parse_head`): neither fails.
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.head.slice_ref(value)),
            ) else {
                continue;
            };
            if name == crate::headers::X_REQUEST_ID {
                crate::headers::never_indexed(&mut value);
            }
            map.append(name, value);
        }
        if self.te_trailers {
            map.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        for (name, value) in self.own {
            map.insert(name, value);
        }
        let mut last = None;
        for (name, value) in held {
            if let Some(name) = name {
                map.remove(&name);
                last = Some(name);
            }
            if let Some(name) = &last {
                map.append(name.clone(), value);
            }
        }
    }
}

/// Reads see the head as it stands: the lines that go on, then what cyan
/// set. Names compare without regard to case.
impl crate::headers::Fields for RawHead {
    fn values<'s>(
        &'s self,
        name: &'s HeaderName,
    ) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's {
        let lower = name.as_str().as_bytes();
        self.forwarded_named(lower).map(|(_, v)| v).chain(
            self.own
                .iter()
                .filter(move |(n, _)| n == name)
                .map(|(_, v)| v.as_bytes()),
        )
    }

    /// `values(name).next()` as a plain loop, names compared a word at a
    /// time ([`crate::headers::name_eq_lower`]): the sticky and override
    /// lookups go through here, and the iterator chain with a byte-wise
    /// compare was about half of a sticky route decision (`perf`, `cargo
    /// bench --bench hot_path -- sticky_header_lines`: 69.8 -> 42 ns).
    ///
    /// The lines a name of its length is on come from the length index
    /// ([`candidates`]): one compare for the first sixteen lines, not one a
    /// line (`bash benches/route_ir.sh sticky_lines`: 498 -> 461
    /// instructions a sticky decision).
    fn first<'s>(&'s self, name: &'s HeaderName) -> Option<&'s [u8]> {
        let lower = name.as_str().as_bytes();
        if self.lens & len_bit(lower.len()) != 0 {
            let mut at = candidates(&self.len_at, lower.len());
            while at != 0 {
                let i = at.trailing_zeros() as usize / 8;
                at &= at - 1;
                let Some(&line) = self.lines.get(i) else {
                    break;
                };
                // A line marked out since it was indexed is passed over.
                if line[1] & GOES_ON != 0 {
                    let (n, v) = line_of(&self.head, line);
                    if crate::headers::name_eq_lower(n, lower) {
                        return Some(v);
                    }
                }
            }
        }
        if self.lines.len() > INDEXED || !self.own.is_empty() {
            return self.first_unindexed(name, lower);
        }
        None
    }

    fn has(&self, name: &HeaderName) -> bool {
        self.first(name).is_some()
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.forwarded().chain(
            self.own
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        )
    }
}

impl crate::headers::FieldsMut for RawHead {
    fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        RawHead::set(self, name.clone(), value);
    }

    fn remove(&mut self, name: &HeaderName) {
        self.mark_out(name);
        self.own.retain(|(n, _)| n != name);
    }

    /// The same rule as the map's strip ([`crate::headers::hop_by_hop_lines`]).
    /// A head held as lines never asks for an upgrade (cyan's own server
    /// leaves those to hyper), so `keep_upgrade` is never set.
    fn strip(&mut self, keep_upgrade: bool) {
        debug_assert!(!keep_upgrade, "an upgrade request held as lines");
        let (keep, te_trailers) = {
            let (head, lines) = (&self.head, &self.lines);
            crate::headers::hop_by_hop_lines(lines.len(), |i| line_of(head, lines[i]))
        };
        for (i, l) in self.lines.iter_mut().enumerate() {
            if keep & (1 << i) == 0 {
                l[1] &= !GOES_ON;
            }
        }
        self.te_trailers = te_trailers;
    }

    fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        RawHead::value(self, name)
    }

    fn sensitive(&mut self, name: &HeaderName) -> Option<HeaderValue> {
        let mut v = RawHead::value(self, name)?;
        crate::headers::never_indexed(&mut v);
        Some(v)
    }
}

/// Parses a complete head at the front of `buf` and consumes it; `None`
/// when more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, RawError> {
    // One parse, while the buffer is borrowed: each header is noted as the
    // offsets of its name and value in the frozen head below. The parser's
    // array is left uninitialized: zeroing 100 headers cost more than
    // parsing a head.
    let (len, mut lines, status, version, lens, len_at) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RawError::Invalid("too many headers"))
            }
            Err(_) => return Err(RawError::Invalid("malformed response head")),
        };
        let base = buf.as_ptr() as usize;
        let mut lines = Vec::with_capacity(resp.headers.len());
        let (mut lens, mut len_at) = (0, [0; INDEXED]);
        for (i, h) in resp.headers.iter().enumerate() {
            // httparse takes what a `HeaderName` and a `HeaderValue` take
            // (tokens; tab, visible ASCII and obs-text), as each must become
            // one for hyper's server, but for a name's length, which a
            // `HeaderName` bounds: a longer one is refused here, as it was
            // when every line became one.
            if h.name.len() > MAX_NAME_BYTES {
                return Err(RawError::Invalid("invalid header name"));
            }
            // Its slices are of `buf`: the offsets are exact and below 2^24
            // (`GOES_ON` is free).
            lens |= len_bit(h.name.len());
            index_len(&mut len_at, i, h.name.len());
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            lines.push([
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            ]);
        }
        (
            len,
            lines,
            resp.code.unwrap_or(0),
            resp.version,
            lens,
            len_at,
        )
    };
    let status = StatusCode::from_u16(status).map_err(|_| RawError::Invalid("invalid status"))?;
    let version = if version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let head = buf.split_to(len).freeze();
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Parsed::Interim));
    }
    // One pass for what framing and reuse depend on (a name's length picks
    // the one to compare).
    let (mut close, mut keep_alive, mut te_last) = (false, false, None);
    // The Content-Length lines: how many, and the last.
    let (mut cl_lines, mut cl_last) = (0usize, 0usize);
    for (i, &l) in lines.iter().enumerate() {
        let (name, value) = line_of(&head, l);
        match name.len() {
            10 if crate::headers::name_eq_lower(name, b"connection") => {
                close |= crate::headers::list_has_token(value, b"close");
                keep_alive |= crate::headers::list_has_token(value, b"keep-alive");
            }
            14 if crate::headers::name_eq_lower(name, b"content-length") => {
                cl_lines += 1;
                cl_last = i;
            }
            17 if crate::headers::name_eq_lower(name, b"transfer-encoding") => te_last = Some(i),
            _ => {}
        }
    }
    let mut reuse = match version {
        Version::HTTP_10 => keep_alive,
        _ => !close,
    };
    let framing = if head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        Framing::Empty
    } else if let Some(last) = te_last {
        if last_coding_is_chunked(line_of(&head, lines[last]).1) {
            Framing::Chunked
        } else {
            reuse = false;
            Framing::Close
        }
    } else if cl_lines > 0 {
        let length = if cl_lines == 1 {
            content_length(std::iter::once(line_of(&head, lines[cl_last]).1))
        } else {
            content_length(values_of(&head, &lines, b"content-length"))
        };
        match length? {
            0 => Framing::Empty,
            n => Framing::Length(n),
        }
    } else {
        reuse = false;
        Framing::Close
    };
    let (forward, te_trailers) =
        crate::headers::hop_by_hop_lines(lines.len(), |i| line_of(&head, lines[i]));
    for (i, l) in lines.iter_mut().enumerate() {
        if forward & (1 << i) != 0 {
            l[1] |= GOES_ON;
        }
    }
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    let raw = RawHead {
        head,
        lines: lines.into_boxed_slice(),
        te_trailers,
        framed_twice: te_last.is_some() && cl_lines > 0,
        own: Vec::new(),
        lens,
        len_at,
    };
    Ok(Some(Parsed::Final(parts, raw, framing, reuse)))
}

/// A line's name and value in `head` (the [`GOES_ON`] mark left out).
#[inline]
fn line_of(head: &[u8], [n0, n1, v0, v1]: [u32; 4]) -> (&[u8], &[u8]) {
    (
        &head[n0 as usize..(n1 & !GOES_ON) as usize],
        &head[v0 as usize..v1 as usize],
    )
}

/// The values of the lines named `name` (lowercase letters and `-`).
fn values_of<'a>(
    head: &'a [u8],
    lines: &'a [[u32; 4]],
    name: &'static [u8],
) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
    lines
        .iter()
        .map(move |&l| line_of(head, l))
        .filter(move |(n, _)| crate::headers::name_eq_lower(n, name))
        .map(|(_, v)| v)
}

/// Parses the response heads at the front of `data` as the client does
/// (interim answers skipped) and checks what it decided, panicking on a
/// broken invariant: for the fuzzer ([`crate::fuzz_targets`]).
pub fn parse_response_head(data: &[u8], head_request: bool) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match parse_head(&mut buf, head_request) {
            Err(_) | Ok(None) => return,
            Ok(Some(Parsed::Interim)) => {
                assert!(buf.len() < before, "an interim head consumed nothing")
            }
            Ok(Some(Parsed::Final(_, raw, framing, reuse))) => {
                assert!(buf.len() < before, "a head consumed nothing");
                let all = |name: &'static [u8]| values_of(&raw.head, &raw.lines, name);
                let te = all(b"transfer-encoding").next().is_some();
                match framing {
                    Framing::Empty => {}
                    Framing::Chunked => assert!(te && !head_request),
                    Framing::Length(n) => {
                        assert!(n > 0 && !te && !head_request);
                        assert_eq!(content_length(all(b"content-length")).ok(), Some(n));
                    }
                    Framing::Close => assert!(!reuse, "a close-framed body on a reused connection"),
                }
                // Every line that goes on becomes a header for hyper's server.
                let mut map = HeaderMap::new();
                raw.clone().append_to(&mut map);
                assert_eq!(
                    map.len(),
                    raw.forwarded().count() + usize::from(raw.te_trailers())
                );
                for (name, _) in raw.forwarded() {
                    assert_eq!(
                        crate::headers::hop_by_hop_lines(1, |_| (name, &b""[..])).0,
                        1,
                        "a hop-by-hop line went on"
                    );
                }
                return;
            }
        }
    }
}

fn last_coding_is_chunked(last_te: &[u8]) -> bool {
    last_te
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Every `Content-Length` value (lists included) must be the same number.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<u64, RawError> {
    let mut found: Option<u64> = None;
    for v in values {
        for part in v.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(RawError::Invalid("invalid Content-Length"));
            }
            // At most 19 digits: below 10^19, inside a u64.
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err(RawError::Invalid("conflicting Content-Length"));
            }
            found = Some(n);
        }
    }
    found.ok_or(RawError::Invalid("invalid Content-Length"))
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

#[derive(Debug)]
enum State {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// A response body read from a [`RawConn`], chunk by chunk, each at most
/// `read_buffer_bytes`. When it ends cleanly on a reusable connection, the
/// connection is handed back by [`RawBody::take_conn`].
#[derive(Debug)]
pub struct RawBody {
    conn: Option<RawConn>,
    state: State,
    reuse: bool,
    limit: usize,
}

impl RawBody {
    pub fn new(conn: RawConn, framing: Framing, reuse: bool, limit: usize) -> RawBody {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::Close => State::Close,
        };
        RawBody {
            conn: Some(conn),
            state,
            reuse,
            limit: limit.max(1024),
        }
    }

    /// The connection, once the body ended and when it may be reused:
    /// nothing is left over in its buffer.
    pub fn take_conn(&mut self) -> Option<RawConn> {
        match self.state {
            State::Done if self.reuse => self.conn.take().filter(|c| c.buf.is_empty()),
            _ => None,
        }
    }

    /// Drops the connection with a reset when its response was abandoned
    /// before its end.
    pub fn abandon(&mut self) {
        if !matches!(self.state, State::Done) {
            if let Some(c) = self.conn.take() {
                c.reset();
            }
        }
    }

    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        mut at: Chunked,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let limit = self.limit;
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let bad = |what: &'static str| io::Error::new(io::ErrorKind::InvalidData, what);
        loop {
            let buf = &mut conn.buf;
            let step: Option<Result<Frame<Bytes>, io::Error>> = match at {
                Chunked::Size => match find_crlf(buf) {
                    Some(end) => {
                        let size =
                            parse_chunk_size(&buf[..end]).ok_or(bad("invalid chunk size"))?;
                        buf.advance(end + 2);
                        at = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                        continue;
                    }
                    None if buf.len() > MAX_CHUNK_LINE => {
                        return Poll::Ready(Some(Err(bad("chunk size line too long"))))
                    }
                    None => None,
                },
                Chunked::Data(rem) if !buf.is_empty() => {
                    let n = (buf.len() as u64).min(rem) as usize;
                    let data = buf.split_to(n).freeze();
                    at = if rem == n as u64 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(rem - n as u64)
                    };
                    Some(Ok(Frame::data(data)))
                }
                Chunked::Data(_) => None,
                Chunked::DataEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(bad("chunk data not followed by CRLF"))));
                    }
                    buf.advance(2);
                    at = Chunked::Size;
                    continue;
                }
                Chunked::DataEnd => None,
                Chunked::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        return Poll::Ready(None);
                    }
                    match find(buf, b"\r\n\r\n") {
                        Some(end) => {
                            let section = buf.split_to(end + 4);
                            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                            let map = match httparse::parse_headers(&section, &mut headers) {
                                Ok(httparse::Status::Complete((_, hs))) => {
                                    let mut map = HeaderMap::with_capacity(hs.len());
                                    for h in hs {
                                        let name = HeaderName::from_bytes(h.name.as_bytes())
                                            .map_err(|_| bad("invalid trailer name"))?;
                                        let value = HeaderValue::from_bytes(h.value)
                                            .map_err(|_| bad("invalid trailer value"))?;
                                        map.append(name, value);
                                    }
                                    map
                                }
                                _ => return Poll::Ready(Some(Err(bad("malformed trailers")))),
                            };
                            self.state = State::Done;
                            return Poll::Ready(Some(Ok(Frame::trailers(map))));
                        }
                        None if buf.len() >= limit => {
                            return Poll::Ready(Some(Err(bad("trailers too large"))))
                        }
                        None => None,
                    }
                }
            };
            if let Some(frame) = step {
                self.state = State::Chunked(at);
                return Poll::Ready(Some(frame));
            }
            // More bytes are needed.
            self.state = State::Chunked(at);
            let want = match at {
                Chunked::Data(rem) => (rem as usize).min(limit),
                _ => limit,
            };
            let hold = conn.buf.len() + want.max(1);
            let n = ready!(fill(&mut conn.io, &mut conn.buf, hold, cx))?;
            if n == 0 {
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    RawError::Truncated,
                ))));
            }
        }
    }
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n")
}

/// `chunk-size [ chunk-ext ]`: 1 to 16 hex digits, then optional blanks
/// and extensions (`;` …) that are ignored. Anything else is refused.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return None;
    }
    if rest.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match this.state {
            State::Done => Poll::Ready(None),
            State::Chunked(at) => {
                let r = this.poll_chunked(cx, at);
                if let Poll::Ready(Some(Err(_))) = &r {
                    this.state = State::Done;
                    this.reuse = false;
                }
                r
            }
            State::Length(rem) => {
                let limit = this.limit;
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                if conn.buf.is_empty() {
                    let want = (rem as usize).min(limit);
                    match ready!(fill(&mut conn.io, &mut conn.buf, want, cx)) {
                        Ok(0) => {
                            this.state = State::Done;
                            this.reuse = false;
                            return Poll::Ready(Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                RawError::Truncated,
                            ))));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            this.state = State::Done;
                            this.reuse = false;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                let n = (conn.buf.len() as u64).min(rem) as usize;
                let data = conn.buf.split_to(n).freeze();
                let left = rem - n as u64;
                this.state = if left == 0 {
                    State::Done
                } else {
                    State::Length(left)
                };
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            State::Close => {
                let limit = this.limit;
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                if conn.buf.is_empty() {
                    match ready!(fill(&mut conn.io, &mut conn.buf, limit, cx)) {
                        Ok(0) => {
                            this.state = State::Done;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                let data = conn.buf.split().freeze();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A raw connection whose endpoint answers `answer` to the first head
    /// it reads, then keeps the socket open (or closes it: `close`).
    async fn conn_answering(answer: &'static [u8], close: bool) -> RawConn {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(answer).await.unwrap();
            if close {
                drop(s);
            } else {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let mut c = RawConn::new(TcpStream::connect(addr).await.unwrap());
        c.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        c
    }

    async fn exchange(
        answer: &'static [u8],
        close: bool,
        head: bool,
    ) -> Result<(u16, Vec<u8>, Option<HeaderMap>, bool), String> {
        let mut c = conn_answering(answer, close).await;
        let (parts, _, framing, reuse) =
            c.read_head(16384, head).await.map_err(|e| e.to_string())?;
        let mut body = RawBody::new(c, framing, reuse, 16384);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            let f = f.map_err(|e| e.to_string())?;
            if let Some(d) = f.data_ref() {
                data.extend_from_slice(d);
            } else {
                trailers = f.into_trailers().ok();
            }
        }
        let reusable = body.take_conn().is_some();
        Ok((parts.status.as_u16(), data, trailers, reusable))
    }

    #[test]
    fn content_length_values_are_whole_decimal_numbers_that_agree() {
        let cl = |vs: &[&str]| content_length(vs.iter().map(|v| v.as_bytes())).ok();
        assert_eq!(cl(&["0"]), Some(0));
        assert_eq!(cl(&[" 42 "]), Some(42));
        assert_eq!(cl(&["7, 7", "7"]), Some(7));
        assert_eq!(
            cl(&["9999999999999999999"]),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(cl(&["00012"]), Some(12));
        for bad in [
            &["18446744073709551616"][..],
            &["1,2"],
            &["1", "2"],
            &["-1"],
            &["1 2"],
            &[""],
            &["１"],
            &[],
        ] {
            assert_eq!(cl(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn content_length_body_and_reuse() {
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!((r.0, &r.1[..], r.3), (200, &b"hello"[..], true));
        // HEAD: no body, whatever Content-Length says.
        let r = exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false, true)
            .await
            .unwrap();
        assert_eq!((r.0, r.1.len(), r.3), (200, 0, true));
        // Connection: close and HTTP/1.0 without keep-alive are not reused.
        let r = exchange(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            true,
            false,
        )
        .await
        .unwrap();
        assert_eq!((&r.1[..], r.3), (&b"ok"[..], false));
        let r = exchange(
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            true,
            false,
        )
        .await
        .unwrap();
        assert!(!r.3);
        // Bytes past the end of the response: not reused.
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!((&r.1[..], r.3), (&b"ok"[..], false));
    }

    #[tokio::test]
    async fn a_kept_timer_is_pushed_back_for_each_exchange() {
        let mut c = conn_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
        let t = c.take_timer(Duration::from_millis(60));
        c.keep_timer(t);
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Pushed back: it must not fire at its first deadline (20 ms on).
        let start = std::time::Instant::now();
        let mut t = c.take_timer(Duration::from_millis(250));
        (&mut t).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(240),
            "fired after {waited:?}"
        );
        // A timer that fired is armed again by the next exchange.
        c.keep_timer(t);
        let start = std::time::Instant::now();
        c.take_timer(Duration::from_millis(50)).await;
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(45)..Duration::from_millis(1000)).contains(&waited),
            "re-armed timer fired after {waited:?}"
        );
    }

    /// Status, reuse and the names of the lines that go on, for one head.
    /// A request head as cyan's own server holds it, and as a map.
    fn request_both(lines: &[(&str, &str)]) -> (RawHead, HeaderMap) {
        let mut text = b"GET / HTTP/1.1\r\n".to_vec();
        let mut offsets = Vec::new();
        let mut map = HeaderMap::new();
        for (n, v) in lines {
            let n0 = text.len();
            text.extend_from_slice(n.as_bytes());
            text.extend_from_slice(b": ");
            let v0 = text.len();
            text.extend_from_slice(v.as_bytes());
            text.extend_from_slice(b"\r\n");
            offsets.push([
                n0 as u32,
                (n0 + n.len()) as u32,
                v0 as u32,
                (v0 + v.len()) as u32,
            ]);
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        text.extend_from_slice(b"\r\n");
        (RawHead::request(Bytes::from(text), offsets), map)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The length index names exactly the indexed lines whose name has
        /// the length looked up (255 standing for 255 and longer), and no
        /// slot past the last line.
        #[test]
        fn the_length_index_names_the_lines_of_that_length(
            lens in proptest::collection::vec(proptest::prop_oneof![1usize..12, 250usize..300], 0..=INDEXED),
            n in proptest::prop_oneof![1usize..12, 250usize..300],
        ) {
            let mut len_at = [0; INDEXED];
            for (i, &l) in lens.iter().enumerate() {
                index_len(&mut len_at, i, l);
            }
            let want = lens
                .iter()
                .enumerate()
                .filter(|&(_, &l)| l.min(255) == n.min(255))
                .fold(0u128, |m, (i, _)| m | 1 << (8 * i));
            proptest::prop_assert_eq!(candidates(&len_at, n), want);
        }

        /// The request path reads and rewrites a head held as lines as it
        /// does a map: the same answers to every lookup, and the same
        /// headers going upstream, whichever client sends them.
        #[test]
        fn a_head_held_as_lines_is_read_and_rewritten_as_the_map_is(
            // Up to 24 lines: past the sixteen the length index holds.
            picks in proptest::collection::vec((0usize..20, 0usize..16), 0..24),
            trusted in proptest::bool::ANY,
            tls in proptest::bool::ANY,
            drop_override in proptest::bool::ANY,
        ) {
            use crate::headers::{self, Fields, FieldsMut};
            const NAMES: [&str; 20] = [
                "Host", "host", "X-Forwarded-For", "x-forwarded-for", "X-Forwarded-Proto",
                "x-forwarded-host", "X-Request-Id", "Connection", "Keep-Alive", "TE",
                "Proxy-Connection", "Cookie", "X-Custom", "x-custom", "Accept", "X-Override",
                "Upgrade", "Transfer-Encoding", "Content-Type", "X-Forwarded-Host",
            ];
            const VALUES: [&str; 16] = [
                "a.example", "192.0.2.1", "10.0.0.1, 192.0.2.7", "keep-alive", "x-custom",
                "trailers", "gzip, trailers", "blue", "green", "abc-123", "has space",
                "x-custom, keep-alive, host", "", "s=1; sticky=u42", "application/grpc",
                "X-Override",
            ];
            let lines: Vec<(&str, &str)> = picks.iter().map(|&(n, v)| (NAMES[n], VALUES[v])).collect();
            let (mut raw, mut map) = request_both(&lines);
            // Reads.
            let l = {
                let text = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n[[service]]\nname = \"s\"\nblue = { endpoints = [\"127.0.0.1:1\"] }\ngreen = { endpoints = [\"127.0.0.1:2\"] }\n";
                crate::config::Config::parse(text).unwrap().listeners.remove(0)
            };
            let peer: std::net::IpAddr = if trusted { [10, 0, 0, 9].into() } else { [198, 51, 100, 1].into() };
            proptest::prop_assert_eq!(headers::client_ip(&raw, peer, &l), headers::client_ip(&map, peer, &l));
            proptest::prop_assert_eq!(
                crate::split::cookie_value(&raw, "sticky"),
                crate::split::cookie_value(&map, "sticky")
            );
            proptest::prop_assert_eq!(headers::is_grpc(&raw), headers::is_grpc(&map));
            proptest::prop_assert_eq!(
                headers::is_upgrade_request(&raw, Version::HTTP_11),
                headers::is_upgrade_request(&map, Version::HTTP_11)
            );
            let bare = Request::get("/").body(()).unwrap();
            let mut with_map = Request::get("/").body(()).unwrap();
            *with_map.headers_mut() = map.clone();
            proptest::prop_assert_eq!(
                headers::check_request_with(&bare, &raw, 8192),
                headers::check_request(&with_map, 8192)
            );
            for name in [header::HOST, header::COOKIE, headers::X_FORWARDED_FOR.clone(), HeaderName::from_static("x-custom")] {
                proptest::prop_assert_eq!(raw.values(&name).collect::<Vec<_>>(), Fields::values(&map, &name).collect::<Vec<_>>());
                proptest::prop_assert_eq!(FieldsMut::value(&raw, &name), FieldsMut::value(&map, &name));
                proptest::prop_assert_eq!(Fields::first(&raw, &name), Fields::first(&map, &name));
                proptest::prop_assert_eq!(Fields::has(&raw, &name), Fields::has(&map, &name));
            }
            // Rewrites, in the request path's order.
            raw.strip(false);
            map.strip(false);
            if drop_override {
                let name = HeaderName::from_static("x-override");
                FieldsMut::remove(&mut raw, &name);
                FieldsMut::remove(&mut map, &name);
            }
            let host = FieldsMut::value(&map, &header::HOST);
            let peer_value = headers::peer_value(peer);
            headers::set_forwarding_with(&mut raw, &peer_value, trusted, tls, host.as_ref());
            headers::set_forwarding_with(&mut map, &peer_value, trusted, tls, host.as_ref());
            let id_raw = headers::ensure_request_id(&mut raw);
            let id_map = headers::ensure_request_id(&mut map);
            // Lookups after the rewrites: lines marked out, values cyan set.
            for name in [header::HOST, headers::X_FORWARDED_FOR.clone(), header::CONNECTION, HeaderName::from_static("x-override")] {
                proptest::prop_assert_eq!(Fields::first(&raw, &name), Fields::first(&map, &name));
                proptest::prop_assert_eq!(Fields::has(&raw, &name), Fields::has(&map, &name));
            }
            // Its value may be random on both sides; the one set is found.
            proptest::prop_assert_eq!(Fields::first(&raw, &headers::X_REQUEST_ID), Some(id_raw.as_bytes()));
            proptest::prop_assert_eq!(Fields::first(&map, &headers::X_REQUEST_ID), Some(id_map.as_bytes()));
            // What goes upstream, through hyper's client (a map) and through
            // cyan's own (the encoded head, read back).
            let mut through_hyper = HeaderMap::new();
            raw.clone().append_to(&mut through_hyper);
            let mut encoded = Vec::new();
            encode_head(&bare, Some(&raw), &mut encoded);
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut hs);
            proptest::prop_assert!(parsed.parse(&encoded).unwrap().is_complete());
            let mut through_own = HeaderMap::new();
            for h in parsed.headers.iter() {
                through_own.append(
                    HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            if id_raw != id_map {
                // Both made anew (the incoming one was not kept): random.
                proptest::prop_assert_eq!((id_raw.len(), id_map.len()), (32, 32));
                for m in [&mut map, &mut through_hyper, &mut through_own] {
                    proptest::prop_assert_eq!(m.get_all(&headers::X_REQUEST_ID).iter().count(), 1);
                    m.remove(&headers::X_REQUEST_ID);
                }
            }
            proptest::prop_assert_eq!(&through_hyper, &map);
            proptest::prop_assert_eq!(&through_own, &map);
        }
    }

    fn parsed(head: &[u8]) -> (u16, bool, Vec<String>) {
        let mut buf = BytesMut::from(head);
        match parse_head(&mut buf, false) {
            Ok(Some(Parsed::Final(parts, raw, _, reuse))) => (
                parts.status.as_u16(),
                reuse,
                raw.forwarded()
                    .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                    .collect(),
            ),
            other => panic!("not a final head: {:?}", other.map(|p| p.is_some())),
        }
    }

    #[test]
    fn connection_lines_decide_reuse_and_are_never_forwarded() {
        let (_, reuse, names) =
            parsed(b"HTTP/1.1 200 OK\r\nConnection:  Keep-Alive \r\ncontent-length: 0\r\n\r\n");
        assert!(reuse);
        assert_eq!(names, ["content-length"]);
        // `close` ends reuse and takes a header called `close` out too.
        let (_, reuse, names) = parsed(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\nClose: 1\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(!reuse);
        assert_eq!(names, ["content-length"]);
        // HTTP/1.0: reused only when it asks for keep-alive.
        let (_, reuse, _) =
            parsed(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(reuse);
        let (_, reuse, _) = parsed(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!reuse);
        // Two lines: close in either wins on HTTP/1.1.
        let (_, reuse, _) = parsed(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(!reuse);
        // Names a Connection line lists go, before or after it, any case;
        // Host and Content-Length never do.
        let (_, reuse, names) = parsed(
            b"HTTP/1.1 200 OK\r\nX-Before: 1\r\nconnection: X-HOP, x-before, host, content-length\r\nx-hop: 1\r\nx-stays: 1\r\nhost: h\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(reuse);
        assert_eq!(names, ["x-stays", "host", "content-length"]);
        // The fixed hop-by-hop names go whatever Connection says; TE listing
        // trailers becomes `te: trailers`.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nTE: gzip, trailers\r\nx: y\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let Ok(Some(Parsed::Final(_, raw, _, _))) = parse_head(&mut buf, false) else {
            panic!("not parsed");
        };
        let names: Vec<_> = raw.forwarded().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [b"x".to_vec(), b"content-length".to_vec()]);
        assert!(raw.te_trailers());
        // Values are the head's own bytes, in order, duplicates kept.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nX: y\r\nset-cookie: b=2\r\ncontent-length: 3\r\n\r\nabc"[..]);
        let Ok(Some(Parsed::Final(_, raw, framing, _))) = parse_head(&mut buf, false) else {
            panic!("not parsed");
        };
        let lines: Vec<_> = raw.forwarded().collect();
        assert_eq!(
            lines,
            [
                (&b"set-cookie"[..], &b"a=1"[..]),
                (b"X", b"y"),
                (b"set-cookie", b"b=2"),
                (b"content-length", b"3")
            ]
        );
        assert_eq!(raw.get(b"x"), Some(&b"y"[..]));
        assert_eq!(framing, Framing::Length(3));
        assert!(!raw.framed_twice);
        assert_eq!(&buf[..], b"abc");
        // Both framings: marked, for a 502.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        );
        let Ok(Some(Parsed::Final(_, raw, framing, _))) = parse_head(&mut buf, false) else {
            panic!("not parsed");
        };
        assert!(raw.framed_twice);
        assert_eq!(framing, Framing::Chunked);
        // A control byte in a value is refused, as a `HeaderValue` would,
        // and a name longer than a `HeaderName` takes.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: a\x01b\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false).is_err());
        for (len, ok) in [(MAX_NAME_BYTES, true), (MAX_NAME_BYTES + 1, false)] {
            let name = "n".repeat(len);
            let head = format!("HTTP/1.1 200 OK\r\n{name}: 1\r\ncontent-length: 0\r\n\r\n");
            let mut buf = BytesMut::from(head.as_bytes());
            match parse_head(&mut buf, false) {
                Ok(Some(Parsed::Final(_, raw, _, _))) => {
                    assert!(ok, "a {len}-byte name was taken");
                    let mut map = HeaderMap::new();
                    raw.append_to(&mut map);
                    assert_eq!(map.len(), 2, "every line becomes a header");
                }
                Err(_) => assert!(!ok, "a {len}-byte name was refused"),
                Ok(_) => panic!("not a final head"),
            }
        }
    }

    #[test]
    fn lines_make_the_same_map_as_the_strip_over_a_map() {
        // What hyper's server gets from the lines is what the hop-by-hop
        // strip left of a map of the same head, with what cyan set
        // replacing lines of the same name.
        let head = b"HTTP/1.1 200 OK\r\nServer: s\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nSet-Cookie: a\r\nX-Color: upstream\r\nSet-Cookie: b\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Request-Id: abc\r\nContent-Length: 2\r\n\r\nok";
        let mut buf = BytesMut::from(&head[..]);
        let Ok(Some(Parsed::Final(_, raw, _, _))) = parse_head(&mut buf, false) else {
            panic!("not parsed");
        };
        // Set on the lines (cyan's own server path), or held in the map
        // the lines go into: the same.
        let mut set = raw.clone();
        set.set(
            HeaderName::from_static("x-color"),
            HeaderValue::from_static("green"),
        );
        assert!(set.forwarded().all(|(n, _)| n != b"X-Color"));
        let mut from_lines = HeaderMap::new();
        set.append_to(&mut from_lines);
        let mut held = HeaderMap::new();
        held.insert("x-color", HeaderValue::from_static("green"));
        raw.clone().append_to(&mut held);
        assert_eq!(held, from_lines);

        let mut map = HeaderMap::new();
        for (n, v) in raw.lines.iter().map(|&l| line_of(&raw.head, l)) {
            map.append(
                HeaderName::from_bytes(n).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        crate::headers::strip_hop_by_hop(&mut map, false);
        map.insert("x-color", HeaderValue::from_static("green"));

        let sorted = |m: &HeaderMap| {
            let mut v: Vec<_> = m
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&from_lines), sorted(&map));
        assert_eq!(from_lines["x-color"], "green");
        assert_eq!(from_lines.get_all("set-cookie").iter().count(), 2);
        assert!(from_lines["x-request-id"].is_sensitive());
        assert!(!from_lines.contains_key("x-hop"));
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n",
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!(&r.1[..], b"hello!");
        assert_eq!(r.2.unwrap()["grpc-status"], "0");
        assert!(r.3, "a clean chunked end leaves the connection reusable");
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!((&r.1[..], r.2.is_none(), r.3), (&b"abc"[..], true, true));
    }

    #[tokio::test]
    async fn malformed_framing_is_an_error() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n",
        ] {
            let r = exchange(bad, true, false).await;
            assert!(
                r.is_err(),
                "{:?} was accepted: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5x\r\n\r\nhello",
            b"HTTP/1.1 999x OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let r = exchange(bad, true, false).await;
            assert!(
                r.is_err(),
                "{:?} was accepted: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A body cut short is an error, not a short success.
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            true,
            false,
        )
        .await;
        assert!(r.is_err());
        // The same value repeated is one length.
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!(&r.1[..], b"hello");
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_close_delimited_bodies_read_to_the_end() {
        let r = exchange(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil close",
            true,
            false,
        )
        .await
        .unwrap();
        assert_eq!((r.0, &r.1[..], r.3), (200, &b"until close"[..], false));
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_endpoint_is_not_alive() {
        let mut c = conn_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
        let (_, _, framing, reuse) = c.read_head(16384, false).await.unwrap();
        let mut body = RawBody::new(c, framing, reuse, 16384);
        while body.frame().await.is_some() {}
        let mut c = body.take_conn().expect("reusable");
        assert!(c.alive(), "an endpoint that keeps the connection open");
        // Closed after its answer (the endpoint's side drops the socket).
        let mut c2 = conn_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
        let (_, _, framing, reuse) = c2.read_head(16384, false).await.unwrap();
        let mut body = RawBody::new(c2, framing, reuse, 16384);
        while body.frame().await.is_some() {}
        let mut c2 = body.take_conn().expect("reusable by its headers");
        // Let the close arrive and the reactor see it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!c2.alive(), "closed by the endpoint");
        assert!(c.alive());
        // Nothing at all before a close.
        let mut c3 = conn_answering(b"", true).await;
        assert!(matches!(
            c3.read_head(16384, false).await,
            Err(RawError::ClosedEarly)
        ));
    }

    #[tokio::test]
    async fn a_head_past_the_limit_is_refused() {
        let big: &'static [u8] = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(5000))
                .into_bytes()
                .into_boxed_slice(),
        );
        let mut c = conn_answering(big, false).await;
        assert!(matches!(
            c.read_head(4096, false).await,
            Err(RawError::Invalid("response head too large"))
        ));
    }

    #[test]
    fn eligibility_and_head_encoding() {
        let get = Request::get("/a?b=1")
            .header("host", "example")
            .header("x-forwarded-for", "10.0.0.1")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(eligible(&get));
        let mut out = Vec::new();
        encode_head(&get, None, &mut out);
        assert_eq!(
            out,
            b"GET /a?b=1 HTTP/1.1\r\nhost: example\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        let post = Request::post("/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(!eligible(&post));
        let ws = Request::get("/")
            .header("upgrade", "websocket")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(!eligible(&ws));
        let with_body = Request::get("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(!eligible(&with_body));
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"5 ;x=y"), Some(5));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"5x"), None);
        assert_eq!(parse_chunk_size(b"0x5"), None);
        assert_eq!(parse_chunk_size(b"11111111111111111"), None);
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
    }
}
