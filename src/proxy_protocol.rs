//! PROXY protocol v1 (text) and v2 (binary) headers, read from connections
//! of trusted peers (an L4 load balancer in front of cyan) so the client's
//! address survives.
//!
//! Exactly the header's bytes are consumed; what follows is the client's
//! first HTTP (or TLS) bytes and stays in the socket.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// We refuse v2 headers with more TLV data than this.
const V2_MAX_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed before a PROXY header arrived: {0}")]
    Io(#[from] std::io::Error),
    #[error("no PROXY protocol header from a peer that must send one")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Reads a PROXY header. `Ok(Some(addr))` carries the client's address;
/// `Ok(None)` is a valid header without one (`UNKNOWN`, `LOCAL`: use the
/// peer's address).
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(128);
    buf.resize(12, 0);
    stream.read_exact(&mut buf[..12]).await?;
    if buf[..12] == V2_SIGNATURE {
        buf.resize(16, 0);
        stream.read_exact(&mut buf[12..16]).await?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::Malformed(format!(
                "v2 payload of {len} bytes"
            )));
        }
        buf.resize(16 + len, 0);
        stream.read_exact(&mut buf[16..]).await?;
    } else if buf.starts_with(b"PROXY ") {
        // Usually the whole line is already here: peek for CRLF and take
        // exactly the line; fall back to byte reads for a trickled one.
        let mut peek = [0u8; V1_MAX - 12];
        let n = stream.peek(&mut peek).await?;
        if let Some(end) = find_crlf(&buf, &peek[..n]) {
            let take = end - buf.len();
            let start = buf.len();
            buf.resize(end, 0);
            stream.read_exact(&mut buf[start..start + take]).await?;
        } else {
            while !buf.ends_with(b"\r\n") {
                if buf.len() >= V1_MAX {
                    return Err(ProxyHeaderError::Malformed(
                        "v1 line longer than 107 bytes".into(),
                    ));
                }
                buf.push(stream.read_u8().await?);
            }
        }
    } else {
        return Err(ProxyHeaderError::Missing);
    }
    parse(&buf)
}

/// Where the CRLF ending a v1 line falls, as a total length, given what was
/// read (`head`) and what is waiting (`peeked`).
fn find_crlf(head: &[u8], peeked: &[u8]) -> Option<usize> {
    let mut prev = *head.last()?;
    for (i, &b) in peeked.iter().enumerate() {
        if prev == b'\r' && b == b'\n' {
            return Some(head.len() + i + 1);
        }
        prev = b;
    }
    None
}

/// Parses a complete header.
pub fn parse(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::{v1, v2, HeaderResult};
    match HeaderResult::parse(bytes) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => None,
            (_, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (_, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => None,
        }),
        HeaderResult::V1(Err(e)) => Err(ProxyHeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(ProxyHeaderError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n";
        assert_eq!(
            parse(v1).unwrap(),
            Some("203.0.113.7:51000".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(v6).unwrap(),
            Some("[2001:db8::1]:4000".parse().unwrap())
        );
        assert!(parse(b"PROXY TCP4 nonsense\r\n").is_err());

        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.4:3333".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        assert_eq!(
            parse(&v2).unwrap(),
            Some("198.51.100.4:3333".parse().unwrap())
        );
    }

    #[test]
    fn crlf_search_spans_the_boundary() {
        assert_eq!(find_crlf(b"PROXY UNKNOWN\r", b"\nGET"), Some(15));
        assert_eq!(find_crlf(b"PROXY ", b"UNKNOWN\r\nGET"), Some(15));
        assert_eq!(find_crlf(b"PROXY ", b"UNKNOWN"), None);
    }
}
