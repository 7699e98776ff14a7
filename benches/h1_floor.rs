//! The floor: the least a tokio HTTP/1.1 keep-alive proxy can do per
//! request. httparse on both heads, the forwarding headers appended, an
//! X-Request-Id added to the response, one kept-alive upstream connection
//! per (client connection, backend), round robin. GET only (no request
//! bodies), Content-Length responses only. Not a proxy: a measuring stick
//! for `benches/README.md` ("What a purpose-built path could reach").
//!
//! ```text
//! cargo bench --bench h1_floor -- 127.0.0.1:18095 127.0.0.1:18081 127.0.0.1:18082
//! ```
//! (listen address, then the backends). Without addresses (as under a
//! plain `cargo bench`) it prints this usage and exits.
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    // `cargo bench` passes `--bench`; only addresses count.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 2 {
        eprintln!("usage: cargo bench --bench h1_floor -- LISTEN BACKEND [BACKEND...]");
        return;
    }
    let listen: SocketAddr = args[0].parse().expect("listen address");
    let ups: Vec<SocketAddr> = args[1..]
        .iter()
        .map(|s| s.parse().expect("backend address"))
        .collect();
    let ups: &'static [SocketAddr] = Box::leak(ups.into_boxed_slice());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(listen).await.expect("bind");
        let mut n = 0usize;
        loop {
            let Ok((c, peer)) = l.accept().await else {
                continue;
            };
            let _ = c.set_nodelay(true);
            n += 1;
            tokio::spawn(async move {
                let _ = conn(c, peer, ups, n).await;
            });
        }
    });
}

fn bad(e: impl std::fmt::Debug) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}"))
}

async fn conn(
    mut c: TcpStream,
    peer: SocketAddr,
    ups: &[SocketAddr],
    seed: usize,
) -> io::Result<()> {
    let mut upc: Vec<Option<TcpStream>> = ups.iter().map(|_| None).collect();
    let mut buf = vec![0u8; 16384];
    let mut len = 0;
    let mut rbuf = vec![0u8; 16384];
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut k = seed;
    let xff = format!(
        "X-Forwarded-For: {}\r\nX-Forwarded-Proto: http\r\n",
        peer.ip()
    );
    let mut id = 0u64;
    loop {
        let head_len = loop {
            if len > 0 {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                if let httparse::Status::Complete(n) = req.parse(&buf[..len]).map_err(bad)? {
                    break n;
                }
            }
            let r = c.read(&mut buf[len..]).await?;
            if r == 0 {
                return Ok(());
            }
            len += r;
        };
        out.clear();
        out.extend_from_slice(&buf[..head_len - 2]);
        out.extend_from_slice(xff.as_bytes());
        out.extend_from_slice(b"\r\n");
        buf.copy_within(head_len..len, 0);
        len -= head_len;
        k += 1;
        let i = k % ups.len();
        if upc[i].is_none() {
            let s = TcpStream::connect(ups[i]).await?;
            s.set_nodelay(true)?;
            upc[i] = Some(s);
        }
        let u = upc[i].as_mut().expect("connected");
        u.write_all(&out).await?;
        let mut rlen = 0;
        let (hl, cl) = loop {
            let r = u.read(&mut rbuf[rlen..]).await?;
            if r == 0 {
                return Err(bad("upstream closed"));
            }
            rlen += r;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&rbuf[..rlen]).map_err(bad)? {
                let cl = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                break (n, cl);
            }
        };
        id += 1;
        out.clear();
        out.extend_from_slice(&rbuf[..hl - 2]);
        out.extend_from_slice(format!("X-Request-Id: {seed:08x}{id:016x}\r\n\r\n").as_bytes());
        let have = (rlen - hl).min(cl);
        out.extend_from_slice(&rbuf[hl..hl + have]);
        c.write_all(&out).await?;
        let mut left = cl - have;
        while left > 0 {
            let n = left.min(rbuf.len());
            let r = u.read(&mut rbuf[..n]).await?;
            if r == 0 {
                return Err(bad("upstream closed mid-body"));
            }
            c.write_all(&rbuf[..r]).await?;
            left -= r;
        }
    }
}
