//! What a front proxy must refuse, and what it must rewrite.
//!
//! ## Refused before routing (no upstream request is made)
//! | request | status |
//! | --- | --- |
//! | `CONNECT` | 405 |
//! | head (request line + headers) above `max_header_bytes` | 431 (hyper also caps HTTP/1 heads at its read buffer, set to the same size) |
//! | HTTP/1.1 without Host, with two Host headers, or a Host that is not a host[:port] | 400 |
//! | absolute-form URI whose authority differs from Host | 400 |
//! | HTTP/2 `host` header differing from `:authority`, or neither present | 400 |
//! | `Transfer-Encoding` other than one `chunked` (`chunked, chunked`, `gzip, chunked`, two TE headers) | 400 |
//!
//! hyper itself already refuses invalid or conflicting Content-Length values,
//! obs-fold, NUL bytes and a TE not ending in `chunked`. A request with both
//! Content-Length and `Transfer-Encoding: chunked` is framed by TE, its
//! Content-Length removed, and the connection closed after the response
//! (RFC 9112 §6.3) — hyper does exactly that before we see the request.
//!
//! ## Rewritten both ways
//! Hop-by-hop headers are removed (RFC 9110 §7.6.1): `Connection` and every
//! header it names, `Keep-Alive`, `Proxy-Connection`, `TE` (except
//! `TE: trailers`, which gRPC needs end to end), `Transfer-Encoding` and
//! `Upgrade` (kept, with `Connection: upgrade`, on an upgrade request and its
//! 101). `Host` and `Content-Length` are never removed because a `Connection`
//! header names them.
//!
//! Forwarding headers: `X-Forwarded-For` gets the peer's address appended when
//! the peer is a trusted proxy and replaces any incoming value otherwise;
//! `X-Forwarded-Proto` and `X-Forwarded-Host` are kept from trusted peers and
//! set by cyan otherwise. `X-Request-Id` is passed on when it looks sane
//! (1–128 visible ASCII characters) and generated otherwise.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};

use crate::config::{canonical_ip, ListenerConfig};

/// A request's headers as the request path reads them: a `HeaderMap`
/// (hyper's server path), or the lines of a head cyan's own HTTP/1.1 server
/// parsed ([`crate::h1client::RawHead`]), which it never turns into a map
/// when the request goes to cyan's own client. Every check and rewrite
/// below is written once, over this.
pub trait Fields {
    /// The values of `name`, in order.
    fn values<'s>(&'s self, name: &'s HeaderName)
        -> impl DoubleEndedIterator<Item = &'s [u8]> + 's;

    /// The first value of `name`.
    fn first<'s>(&'s self, name: &'s HeaderName) -> Option<&'s [u8]> {
        self.values(name).next()
    }

    /// Whether there is a `name` header.
    fn has(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }

    /// Every header, name and value.
    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])>;
}

/// What the request path changes on a request's headers.
pub trait FieldsMut: Fields {
    /// Sets `name` to `value`, replacing every value it had.
    fn set(&mut self, name: &HeaderName, value: HeaderValue);

    /// Removes every `name` header.
    fn remove(&mut self, name: &HeaderName);

    /// The first value of `name`, as a `HeaderValue`.
    fn value(&self, name: &HeaderName) -> Option<HeaderValue>;

    /// Removes the hop-by-hop headers ([`strip_hop_by_hop`]).
    fn strip(&mut self, keep_upgrade: bool);

    /// The first value of `name` as a `HeaderValue`, marked
    /// [`never_indexed`] where it stays too.
    fn sensitive(&mut self, name: &HeaderName) -> Option<HeaderValue>;

    /// Room for `n` more headers (a map grows once, not per insert).
    fn reserve(&mut self, _n: usize) {}
}

/// Up to this many values (`first`) or names (`has`), a map is searched by
/// comparing each name rather than by hashing the sought one. `HeaderMap`
/// hashes a name with FNV, one dependent multiply per byte plus eight for
/// the name's kind (and eight more for a standard name's index): ~70 cycles
/// for `x-user-id` in one chain, where a scan's compares do not wait on
/// each other and most fail on the kind or the length. `bash
/// benches/ab.sh`, pinned (benches/README "Map scan"): a sticky decision on
/// a map of seven names 50.5 -> 42.5 ns. An HTTP/2 request from a browser
/// or an API client has 5-15 names.
const MAP_SCAN_MAX: usize = 16;

/// The first value of `name` in a small map ([`MAP_SCAN_MAX`]), by
/// scanning: the map's iterator gives an entry's first value before its
/// others, so the first name that matches holds the first value.
#[inline]
fn scan_first<'s>(map: &'s HeaderMap, name: &HeaderName) -> Option<&'s HeaderValue> {
    map.iter().find_map(|(n, v)| (n == name).then_some(v))
}

impl Fields for HeaderMap {
    fn values<'s>(
        &'s self,
        name: &'s HeaderName,
    ) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }

    fn first<'s>(&'s self, name: &'s HeaderName) -> Option<&'s [u8]> {
        // `len`, not `keys_len`: the scan walks every value, and a request
        // may send one name thousands of times.
        let v = if self.len() <= MAP_SCAN_MAX {
            scan_first(self, name)
        } else {
            self.get(name)
        };
        v.map(HeaderValue::as_bytes)
    }

    fn has(&self, name: &HeaderName) -> bool {
        if self.keys_len() <= MAP_SCAN_MAX {
            return self.keys().any(|n| n == name);
        }
        self.contains_key(name)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    }
}

impl FieldsMut for HeaderMap {
    fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        self.insert(name, value);
    }

    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }

    fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.get(name).cloned()
    }

    fn strip(&mut self, keep_upgrade: bool) {
        strip_hop_by_hop(self, keep_upgrade);
    }

    fn sensitive(&mut self, name: &HeaderName) -> Option<HeaderValue> {
        let v = self.get_mut(name)?;
        never_indexed(v);
        Some(v.clone())
    }

    fn reserve(&mut self, n: usize) {
        HeaderMap::reserve(self, n);
    }
}

/// A header value as text, by `HeaderValue::to_str`'s rule (tab and
/// visible ASCII).
pub fn visible_str(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A request refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// The request's host (with any port), validated. Borrowed from the request.
pub fn check_request<B>(req: &Request<B>, max_header_bytes: usize) -> Result<&str, Reject> {
    check_request_with(req, req.headers(), max_header_bytes)
}

/// [`check_request`] on headers held apart from the request.
pub fn check_request_with<'r, B>(
    req: &'r Request<B>,
    headers: &'r impl Fields,
    max_header_bytes: usize,
) -> Result<&'r str, Reject> {
    if req.method() == Method::CONNECT {
        return Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported",
        ));
    }
    let mut head_bytes = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 16;
    for (name, value) in headers.each() {
        head_bytes += name.len() + value.len() + 4;
    }
    if head_bytes > max_header_bytes {
        return Err(reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large",
        ));
    }
    check_transfer_encoding(headers)?;
    let host = request_host_with(req, headers)?;
    if !valid_host(host) {
        return Err(reject(StatusCode::BAD_REQUEST, "invalid Host"));
    }
    Ok(host)
}

fn check_transfer_encoding(headers: &impl Fields) -> Result<(), Reject> {
    let mut te = headers.values(&header::TRANSFER_ENCODING);
    match (te.next(), te.next()) {
        (None, _) => Ok(()),
        (Some(v), None) if v.trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(reject(
            StatusCode::BAD_REQUEST,
            "unsupported Transfer-Encoding (only a single `chunked` is accepted)",
        )),
    }
}

/// The host a request is for: `:authority` or `Host`, checked against each
/// other (see [`check_request`], which calls it).
pub fn request_host<B>(req: &Request<B>) -> Result<&str, Reject> {
    request_host_with(req, req.headers())
}

/// [`request_host`] on headers held apart from the request.
pub fn request_host_with<'r, B>(
    req: &'r Request<B>,
    headers: &'r impl Fields,
) -> Result<&'r str, Reject> {
    let mut hosts = headers.values(&header::HOST);
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(reject(StatusCode::BAD_REQUEST, "duplicate Host")),
        (h, _) => h,
    };
    let host = match host {
        Some(h) => Some(visible_str(h).ok_or(reject(StatusCode::BAD_REQUEST, "invalid Host"))?),
        None => None,
    };
    let authority = req.uri().authority().map(|a| a.as_str());
    match req.version() {
        Version::HTTP_2 | Version::HTTP_3 => match (authority, host) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(reject(
                StatusCode::BAD_REQUEST,
                "Host differs from :authority",
            )),
            (Some(a), _) => Ok(a),
            (None, Some(h)) => Ok(h),
            (None, None) => Err(reject(StatusCode::BAD_REQUEST, "missing :authority")),
        },
        Version::HTTP_11 => match (authority, host) {
            (_, None) => Err(reject(StatusCode::BAD_REQUEST, "missing Host")),
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(reject(
                StatusCode::BAD_REQUEST,
                "Host differs from the request target's authority",
            )),
            (_, Some(h)) => Ok(h),
        },
        // HTTP/1.0 may omit Host; such requests only match `hosts = ["*"]`.
        _ => Ok(host.or(authority).unwrap_or("")),
    }
}

/// `host[:port]`, `[v6]:port`: letters, digits and `-._:[]` only (no
/// userinfo, no path, no whitespace).
fn valid_host(h: &str) -> bool {
    h.len() <= 255
        && h.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        })
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Upgrade`).
pub fn is_upgrade_request(headers: &impl Fields, version: Version) -> bool {
    version == Version::HTTP_11
        && headers.has(&header::UPGRADE)
        && connection_has_token(headers, b"upgrade")
}

/// Whether a request is gRPC (`content-type: application/grpc`, alone or
/// with a `+proto`/`+json` suffix or parameters): its body is a message
/// stream the server may answer before it ends, so it is never buffered.
pub fn is_grpc(headers: &impl Fields) -> bool {
    headers.first(&header::CONTENT_TYPE).is_some_and(|v| {
        const GRPC: &[u8] = b"application/grpc";
        v.len() >= GRPC.len()
            && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// Whether a `Connection` header lists `token` (case-insensitive).
fn connection_has_token(headers: &impl Fields, token: &[u8]) -> bool {
    headers
        .values(&header::CONNECTION)
        .any(|v| list_has_token(v, token))
}

/// Whether header name `name` (as it came, any case) is `lower`, a
/// lowercase name (a `HeaderName`'s text). Eight bytes at a time, with
/// their uppercase letters lowered ([`lowered`]): the bytes past the whole
/// words first, as one word ([`short_word`]), then the whole words. No
/// byte is read one by one. Any byte from 0x80 keeps its top bit and so
/// never equals a byte of `lower`, as `eq_ignore_ascii_case` has it. A
/// lookup of a nine-byte name cost ~15 ns byte by byte on the bench VM,
/// most of a sticky route decision. Every name compare of the request and
/// response paths goes through here (it replaced `name_is`, an OR-0x20
/// fold that also took CR for `-`).
#[inline]
pub(crate) fn name_eq_lower(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(
        !lower.iter().any(u8::is_ascii_uppercase),
        "name_eq_lower: `lower` must be lowercase"
    );
    if name.len() != lower.len() {
        return false;
    }
    lowered(short_word(name)) == short_word(lower) && {
        // Chunks of exactly eight: `first_chunk` never fails.
        let word = |c: &[u8]| c.first_chunk::<8>().map_or(0, |w| u64::from_le_bytes(*w));
        name.chunks_exact(8)
            .zip(lower.chunks_exact(8))
            .all(|(a, b)| lowered(word(a)) == word(b))
    }
}

/// A name's bytes not in a whole word of eight from its start, as one word:
/// its last eight bytes when it has eight or more (overlapping the words
/// before), else two overlapping halves, else its first, middle and last
/// bytes. Two names of one length are made into words from the same
/// positions, which cover every byte: their words are equal when their
/// bytes are.
#[inline(always)]
fn short_word(b: &[u8]) -> u64 {
    if let Some(last) = b.last_chunk::<8>() {
        return u64::from_le_bytes(*last);
    }
    if let (Some(first), Some(last)) = (b.first_chunk::<4>(), b.last_chunk::<4>()) {
        return u64::from(u32::from_le_bytes(*first)) | u64::from(u32::from_le_bytes(*last)) << 32;
    }
    match b {
        [] => 0,
        [first, .., last] => {
            u64::from(*first) | u64::from(b[b.len() / 2]) << 8 | u64::from(*last) << 16
        }
        [only] => u64::from(*only) * 0x01_01_01,
    }
}

/// Lowers the uppercase ASCII letters of eight bytes at once. A byte is
/// uppercase when its low seven bits are at least `A` (0x41) and below `[`
/// (0x5b) and its top bit is clear: adding 0x3f and 0x25 to the low seven
/// bits sets the top bit for the first and the second bound, no carry
/// crossing a byte.
#[inline(always)]
fn lowered(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const TOP: u64 = 0x8080_8080_8080_8080;
    let h = w & LOW7;
    let from_a = h + 0x3f3f_3f3f_3f3f_3f3f;
    let past_z = h + 0x2525_2525_2525_2525;
    let upper = from_a & !past_z & TOP & !w;
    w | (upper >> 2)
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub(crate) fn list_has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// [`strip_hop_by_hop`] (without `keep_upgrade`) for a head held as its
/// lines instead of a `HeaderMap`: cyan's own HTTP/1.1 client forwards a
/// response that way ([`crate::h1client::RawHead`]). `line(i)` is the name
/// and value of line `i` of `n` (at most 128). Returns the lines that go
/// on, as bits, and whether a `TE: trailers` goes in place of the `TE`
/// lines taken out; names compare without regard to case. The same names
/// go as in the map version: the fixed hop-by-hop ones, and those a
/// `Connection` line lists (never `Host` or `Content-Length`).
pub fn hop_by_hop_lines<'a>(
    n: usize,
    line: impl Fn(usize) -> (&'a [u8], &'a [u8]),
) -> (u128, bool) {
    assert!(n <= 128, "at most 128 lines");
    let mut keep = 0u128;
    let mut te_trailers = false;
    // The Connection lines, as bits.
    let mut connection = 0u128;
    for i in 0..n {
        let (name, value) = line(i);
        match hop_by_hop_name(name) {
            0 => keep |= 1 << i,
            HOP_CONNECTION => connection |= 1 << i,
            HOP_TE => te_trailers |= list_has_token(value, b"trailers"),
            _ => {}
        }
    }
    while connection != 0 {
        let i = connection.trailing_zeros() as usize;
        connection &= connection - 1;
        for token in line(i).1.split(|&b| b == b',') {
            let token = token.trim_ascii();
            // A fixed hop-by-hop name (`keep-alive`, `close` is not one)
            // is out already.
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"host")
                || token.eq_ignore_ascii_case(b"content-length")
                || hop_by_hop_name(token) != 0
            {
                continue;
            }
            for j in 0..n {
                if keep & (1 << j) != 0 && line(j).0.eq_ignore_ascii_case(token) {
                    keep &= !(1 << j);
                }
            }
        }
    }
    (keep, te_trailers)
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` stays and
/// `Connection: upgrade` is set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names (standard names compare as small integers)
    // finds which hop-by-hop headers are there; only those are touched. Most
    // requests carry none; most HTTP/1.1 responses carry `Connection:
    // keep-alive` alone.
    let mut present = 0u8;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name);
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Headers named by Connection. Each token is looked for among the
        // names present (a short scan), so the usual tokens, `keep-alive`
        // and `close`, cost no parsing, hashing or allocation: parsing each
        // into a `HeaderName` and removing it was ~1k instructions per
        // response, nearly every HTTP/1.1 upstream response carrying one.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for token in v.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty()
                    || token.eq_ignore_ascii_case(b"host")
                    || token.eq_ignore_ascii_case(b"content-length")
                    || (keep_upgrade && token.eq_ignore_ascii_case(b"upgrade"))
                {
                    continue;
                }
                let found = headers
                    .keys()
                    .find(|k| k.as_str().as_bytes().eq_ignore_ascii_case(token));
                // The fixed names are removed below, once, if present.
                if let Some(name) = found.filter(|n| hop_by_hop_bit(n) == 0) {
                    named.push(name.clone());
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HOP_TE != 0 {
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_TRANSFER_ENCODING: u8 = 2;
const HOP_TE: u8 = 4;
const HOP_UPGRADE: u8 = 8;
const HOP_KEEP_ALIVE: u8 = 16;
const HOP_PROXY_CONNECTION: u8 = 32;

/// The names removed on every hop, whatever `Connection` lists, as bits.
/// Called for every header of every request and response: the length
/// picks the one or two names to compare (names are lowercase).
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    hop_by_hop_name(name.as_str().as_bytes())
}

/// [`hop_by_hop_bit`] for a name as it came (any case).
fn hop_by_hop_name(s: &[u8]) -> u8 {
    let is = |n: &[u8]| name_eq_lower(s, n);
    match s.len() {
        2 if is(b"te") => HOP_TE,
        7 if is(b"upgrade") => HOP_UPGRADE,
        10 if is(b"connection") => HOP_CONNECTION,
        10 if is(b"keep-alive") => HOP_KEEP_ALIVE,
        16 if is(b"proxy-connection") => HOP_PROXY_CONNECTION,
        17 if is(b"transfer-encoding") => HOP_TRANSFER_ENCODING,
        _ => 0,
    }
}

/// The client's address as cyan believes it: the peer, or — when the peer is
/// a trusted proxy — the rightmost X-Forwarded-For entry that is not itself a
/// trusted proxy.
pub fn client_ip(headers: &impl Fields, peer: IpAddr, listener: &ListenerConfig) -> IpAddr {
    let peer = canonical_ip(peer);
    if !listener.is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    // XFF may be split over several headers; the last one is the nearest hop.
    for v in headers.values(&X_FORWARDED_FOR).rev() {
        let Some(s) = visible_str(v) else {
            return client;
        };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical_ip(ip);
                    if !listener.is_trusted(client) {
                        return client;
                    }
                }
                Err(_) => return client,
            }
        }
    }
    client
}

/// Sets X-Forwarded-For/-Proto/-Host on a request going upstream.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    tls: bool,
    host: &str,
) {
    let host = HeaderValue::from_str(host).ok();
    set_forwarding_with(headers, &peer_value(peer), trusted_peer, tls, host.as_ref());
}

/// The peer's address as a header value (IPv4-mapped IPv6 shown as IPv4),
/// computed once per connection.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&canonical_ip(peer).to_string())
        .expect("an IP address is a valid header value")
}

/// [`set_forwarding`] for the request path: the peer's value was made when
/// the connection opened and `host` is the request's own Host value, so an
/// untrusted peer (the common case) costs no allocation.
pub fn set_forwarding_with(
    headers: &mut impl FieldsMut,
    peer: &HeaderValue,
    trusted_peer: bool,
    tls: bool,
    host: Option<&HeaderValue>,
) {
    // Up to three inserts: grow the table once, not once per insert.
    headers.reserve(3);
    let prior = if trusted_peer {
        let mut prior = String::new();
        for v in headers.values(&X_FORWARDED_FOR) {
            if let Some(s) = visible_str(v) {
                if !prior.is_empty() {
                    prior.push_str(", ");
                }
                prior.push_str(s);
            }
        }
        prior
    } else {
        String::new()
    };
    let xff = if prior.is_empty() {
        Some(peer.clone())
    } else {
        HeaderValue::from_str(&format!("{prior}, {}", peer.to_str().unwrap_or(""))).ok()
    };
    if let Some(v) = xff {
        headers.set(&X_FORWARDED_FOR, v);
    }
    if !(trusted_peer && headers.has(&X_FORWARDED_PROTO)) {
        let proto = if tls { "https" } else { "http" };
        headers.set(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted_peer && headers.has(&X_FORWARDED_HOST)) {
        if let Some(v) = host {
            headers.set(&X_FORWARDED_HOST, v.clone());
        }
    }
}

/// Keeps a sane incoming X-Request-Id or generates one; returns it, marked
/// as [`never_indexed`] like the copy left in `headers`.
pub fn ensure_request_id(headers: &mut impl FieldsMut) -> HeaderValue {
    let sane = {
        let mut ids = headers.values(&X_REQUEST_ID);
        match (ids.next(), ids.next()) {
            (Some(b), None) => {
                (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic())
            }
            _ => false,
        }
    };
    if sane {
        if let Some(v) = headers.sensitive(&X_REQUEST_ID) {
            return v;
        }
    }
    let mut id = new_request_id();
    never_indexed(&mut id);
    headers.set(&X_REQUEST_ID, id.clone());
    id
}

/// Marks a value that differs on every message (a request id) so HTTP/2's
/// HPACK sends it as a literal that is never indexed. Indexed, each new id
/// went into the encoder's dynamic table, where h2 chains entries of one
/// name: every response walked all the ids still in the table comparing
/// values, then evicted one. Never indexed it costs ~10 bytes more on the
/// wire and much less CPU (benches/README.md "Profile"). HTTP/1.1 ignores
/// the flag.
pub fn never_indexed(v: &mut HeaderValue) {
    v.set_sensitive(true);
}

/// 32 lowercase hex characters of randomness.
///
/// Ids are cut from a per-thread block of [`IDS_PER_BLOCK`] made at once:
/// each is a slice of the block's shared bytes, so making one and cloning
/// it (the request, the response and the access log each hold it) costs
/// reference counts. An id of its own allocated twice (its bytes, then the
/// shared header on the first clone), ~0.5k instructions per request.
pub fn new_request_id() -> HeaderValue {
    thread_local! {
        static BLOCK: std::cell::RefCell<bytes::Bytes> = const {
            std::cell::RefCell::new(bytes::Bytes::new())
        };
    }
    BLOCK.with(|block| {
        let mut block = block.borrow_mut();
        if block.len() < ID_LEN {
            *block = id_block();
        }
        // Hex digits are always a valid header value.
        HeaderValue::from_maybe_shared(block.split_to(ID_LEN)).expect("hex is a valid header value")
    })
}

const ID_LEN: usize = 32;
const IDS_PER_BLOCK: usize = 64;

fn id_block() -> bytes::Bytes {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut block = vec![0u8; ID_LEN * IDS_PER_BLOCK];
    for id in block.chunks_exact_mut(ID_LEN) {
        let mut n = fastrand::u128(..);
        for b in id {
            *b = HEX[(n & 0xf) as usize];
            n >>= 4;
        }
    }
    bytes::Bytes::from(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    mod name_eq {
        use super::super::name_eq_lower;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]
            /// The word-wise name comparison agrees with
            /// `eq_ignore_ascii_case` for any `name` bytes against a
            /// lowercase `lower`: names made from `lower` with letters'
            /// case flipped and some bytes replaced by any byte (0x80 and
            /// up included), and unrelated names.
            #[test]
            fn name_eq_lower_is_eq_ignore_ascii_case(
                lower in proptest::collection::vec(any::<u8>().prop_map(|b| b.to_ascii_lowercase()), 0..40),
                flips in proptest::collection::vec(any::<bool>(), 40),
                swaps in proptest::collection::vec((0usize..40, any::<u8>()), 0..3),
                other in proptest::collection::vec(any::<u8>(), 0..40),
            ) {
                let mut name: Vec<u8> = lower
                    .iter()
                    .zip(&flips)
                    .map(|(&b, &f)| if f { b.to_ascii_uppercase() } else { b })
                    .collect();
                prop_assert!(name_eq_lower(&name, &lower));
                for &(at, b) in &swaps {
                    if let Some(x) = name.get_mut(at) {
                        *x = b;
                    }
                }
                prop_assert_eq!(name_eq_lower(&name, &lower), name.eq_ignore_ascii_case(&lower));
                prop_assert_eq!(name_eq_lower(&other, &lower), other.eq_ignore_ascii_case(&lower));
            }
        }
    }

    mod map_scan {
        use super::super::Fields;
        use http::{HeaderMap, HeaderName, HeaderValue};
        use proptest::prelude::*;

        /// Standard names (held by index in `HeaderName`) and custom ones,
        /// some of one length, some prefixes of others.
        const NAMES: [&str; 24] = [
            "host",
            "cookie",
            "accept",
            "authorization",
            "user-agent",
            "te",
            "content-type",
            "x-user-id",
            "x-user-ix",
            "x-request-id",
            "x-a",
            "x-b",
            "x-forwarded-for",
            "x-forwarded-fo",
            "grpc-timeout",
            "x-cyan-color",
            "traceparent",
            "baggage",
            "x-tenant",
            "x-tenant-id",
            "accept-language",
            "x-0",
            "x-1",
            "x-2",
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// A lookup answers as the map's hashed lookup does, whether it
            /// scans (up to `MAP_SCAN_MAX` values) or hashes (more): the
            /// first value of a name sent several times, and absent names.
            #[test]
            fn a_map_lookup_answers_as_the_hashed_one(
                // Appended, inserted (replacing every value) or removed:
                // removals reorder the map's entries.
                ops in proptest::collection::vec((0u8..4, 0usize..24, 0u16..1000), 0..40),
                sought in 0usize..24,
            ) {
                let mut map = HeaderMap::new();
                for &(op, n, v) in &ops {
                    match op {
                        0 | 1 => {
                            map.append(NAMES[n], HeaderValue::from(v));
                        }
                        2 => {
                            map.insert(NAMES[n], HeaderValue::from(v));
                        }
                        _ => {
                            map.remove(NAMES[n]);
                        }
                    }
                }
                let name = HeaderName::from_static(NAMES[sought]);
                prop_assert_eq!(
                    map.first(&name),
                    map.get(&name).map(HeaderValue::as_bytes)
                );
                prop_assert_eq!(map.has(&name), map.contains_key(&name));
            }
        }
    }

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn status(r: Result<&str, Reject>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn rejections() {
        let h11 = |h: &[(&str, &str)]| status(check_request(&req(Version::HTTP_11, "/", h), 65536));
        assert_eq!(h11(&[("host", "a.example")]), 200);
        assert_eq!(h11(&[]), 400);
        assert_eq!(h11(&[("host", "a"), ("host", "b")]), 400);
        assert_eq!(h11(&[("host", "a b")]), 400);
        assert_eq!(h11(&[("host", "user@evil")]), 400);
        assert_eq!(h11(&[("host", "a"), ("transfer-encoding", "chunked")]), 200);
        assert_eq!(
            h11(&[("host", "a"), ("transfer-encoding", "chunked, chunked")]),
            400
        );
        assert_eq!(
            h11(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            400
        );
        assert_eq!(
            h11(&[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            400
        );
        let big = "x".repeat(70_000);
        assert_eq!(h11(&[("host", "a"), ("x-big", &big)]), 431);
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("a.example:443")
            .header("host", "a.example:443")
            .body(())
            .unwrap();
        assert_eq!(status(check_request(&connect, 65536)), 405);
        // Absolute-form must agree with Host.
        assert_eq!(
            status(check_request(
                &req(
                    Version::HTTP_11,
                    "http://a.example/x",
                    &[("host", "b.example")]
                ),
                65536
            )),
            400
        );
        // HTTP/2.
        let h2 = |uri: &str, h: &[(&str, &str)]| {
            status(check_request(&req(Version::HTTP_2, uri, h), 65536))
        };
        assert_eq!(h2("https://a.example/", &[]), 200);
        assert_eq!(h2("https://a.example/", &[("host", "a.example")]), 200);
        assert_eq!(h2("https://a.example/", &[("host", "b.example")]), 400);
        assert_eq!(h2("/", &[]), 400);
        // HTTP/1.0 may omit Host.
        assert_eq!(
            status(check_request(&req(Version::HTTP_10, "/", &[]), 65536)),
            200
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret, host, Content-Length"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("host", HeaderValue::from_static("a"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(h.get("te").unwrap(), "trailers");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!names.contains(&gone), "{gone} still in {names:?}");
        }
        for kept in ["host", "content-length", "x-keep"] {
            assert!(names.contains(&kept), "{kept} missing from {names:?}");
        }
        // Tokens match names whatever their case; a token naming no header
        // (`close`) removes nothing else; two Connection lines both count.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close, X-Other"));
        h.append("connection", HeaderValue::from_static("X-Third"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-third", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&h, Version::HTTP_11));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        let ct = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(ct("Application/GRPC;charset=utf-8"));
        assert!(
            !ct("application/grpc-web"),
            "grpc-web bodies are whole messages"
        );
        assert!(!ct("application/json"));
        assert!(!ct("application/grp"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    fn listener(trusted: &[&str]) -> ListenerConfig {
        let text = format!(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = {trusted:?}\n[[service]]\nname = \"s\"\nblue = {{ endpoints = [\"127.0.0.1:1\"] }}\ngreen = {{ endpoints = [\"127.0.0.1:2\"] }}\n"
        );
        crate::config::Config::parse(&text)
            .unwrap()
            .listeners
            .remove(0)
    }

    #[test]
    fn forwarding_trusts_only_trusted_peers() {
        let l = listener(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.5, 10.1.1.1"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let untrusted: IpAddr = "198.51.100.1".parse().unwrap();
        let trusted: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(client_ip(&h, untrusted, &l), untrusted);
        assert_eq!(
            client_ip(&h, trusted, &l),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );

        let mut a = h.clone();
        set_forwarding(&mut a, trusted, true, false, "a.example");
        assert_eq!(
            a.get("x-forwarded-for").unwrap(),
            "203.0.113.5, 10.1.1.1, 10.0.0.9"
        );
        assert_eq!(a.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(a.get("x-forwarded-host").unwrap(), "a.example");

        let mut b = h.clone();
        set_forwarding(&mut b, untrusted, false, false, "a.example");
        assert_eq!(b.get("x-forwarded-for").unwrap(), "198.51.100.1");
        assert_eq!(b.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h.get("x-request-id").unwrap(), &id);
        // Never indexed by HPACK, both the copy returned and the one sent on.
        assert!(id.is_sensitive() && h.get("x-request-id").unwrap().is_sensitive());
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        let kept = ensure_request_id(&mut h);
        assert_eq!(kept, "abc-123");
        assert!(kept.is_sensitive() && h.get("x-request-id").unwrap().is_sensitive());
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(ensure_request_id(&mut h), "has space");
    }

    #[test]
    fn request_ids_are_distinct_hex_across_blocks() {
        let ids: Vec<HeaderValue> = (0..3 * IDS_PER_BLOCK + 5)
            .map(|_| new_request_id())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            assert_eq!(id.len(), ID_LEN);
            assert!(id
                .as_bytes()
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
            assert!(seen.insert(id.as_bytes().to_vec()), "id repeated: {id:?}");
        }
    }
}
