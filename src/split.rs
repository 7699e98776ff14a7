//! Color and endpoint selection: pure functions, no I/O, no allocation.
//!
//! ## Precedence
//! 1. **Override**: the service's `override_header` reads `blue` or `green`
//!    (`<color>:<secret>` when `override_secret` is set) → that color.
//! 2. **Fixed**: the candidate share is 0 % or 100 % → that color, no hashing.
//! 3. **Sticky**: the sticky key (header, cookie or client IP) is present →
//!    `bucket(seed, key)`; the candidate owns buckets `[0, candidate_bp)`.
//! 4. **Draw**: otherwise a per-request random draw with the same odds.
//!
//! ## The hash (a stable contract)
//! `bucket = XXH3_64(key, seed) mod 10000` where `seed = XXH3_64(salt)` and
//! `salt` defaults to the service name. XXH3-64 is specified byte for byte and
//! gives the same value on every platform, version and implementation (the
//! test vectors below pin it), so every replica with the same config sends a
//! key to the same color. For `client_ip` the key is the address's octets (4
//! for IPv4, including IPv4-mapped IPv6; 16 for IPv6).
//!
//! Because the candidate owns a prefix of the bucket range, raising its share
//! only moves users stable → candidate and lowering it only candidate → stable.

use std::net::IpAddr;

use crate::headers::Fields;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::config::{canonical_ip, Color, OverrideConfig, Sticky};

/// Number of buckets; shares are in basis points.
pub const BUCKETS: u16 = 10_000;

/// Why a request got its color; reported in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorReason {
    Override,
    Fixed,
    Sticky,
    Draw,
}

impl ColorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ColorReason::Override => "override",
            ColorReason::Fixed => "fixed",
            ColorReason::Sticky => "sticky",
            ColorReason::Draw => "draw",
        }
    }
}

/// The hash seed derived from a service's salt.
pub fn seed_for_salt(salt: &str) -> u64 {
    xxh3_64(salt.as_bytes())
}

/// The bucket `[0, 10000)` of a sticky key.
#[inline]
pub fn bucket(seed: u64, key: &[u8]) -> u16 {
    (xxh3_64_with_seed(key, seed) % u64::from(BUCKETS)) as u16
}

/// Everything a color decision needs, prepared when the table is built.
#[derive(Debug, Clone)]
pub struct SplitPolicy {
    pub stable: Color,
    /// Candidate share in basis points.
    pub candidate_bp: u16,
    pub sticky: Option<Sticky>,
    pub seed: u64,
    pub override_: Option<OverrideConfig>,
}

impl SplitPolicy {
    /// The candidate (non-stable) color.
    pub fn candidate(&self) -> Color {
        self.stable.other()
    }

    /// Chooses a color for a request.
    pub fn choose(&self, headers: &impl Fields, client_ip: IpAddr) -> (Color, ColorReason) {
        if let Some(ov) = &self.override_ {
            if let Some(color) = override_color(ov, headers) {
                return (color, ColorReason::Override);
            }
        }
        match self.candidate_bp {
            0 => return (self.stable, ColorReason::Fixed),
            BUCKETS.. => return (self.candidate(), ColorReason::Fixed),
            _ => {}
        }
        let (b, reason) = match self.sticky_bucket(headers, client_ip) {
            Some(b) => (b, ColorReason::Sticky),
            None => (fastrand::u16(0..BUCKETS), ColorReason::Draw),
        };
        let color = if b < self.candidate_bp {
            self.candidate()
        } else {
            self.stable
        };
        (color, reason)
    }

    fn sticky_bucket(&self, headers: &impl Fields, client_ip: IpAddr) -> Option<u16> {
        match self.sticky.as_ref()? {
            Sticky::Header(name) => {
                let v = headers.first(name)?;
                (!v.is_empty()).then(|| bucket(self.seed, v))
            }
            Sticky::Cookie(name) => cookie_value(headers, name).map(|v| bucket(self.seed, v)),
            Sticky::ClientIp => Some(match canonical_ip(client_ip) {
                IpAddr::V4(v4) => bucket(self.seed, &v4.octets()),
                IpAddr::V6(v6) => bucket(self.seed, &v6.octets()),
            }),
        }
    }
}

fn override_color(ov: &OverrideConfig, headers: &impl Fields) -> Option<Color> {
    let v = headers.first(&ov.header)?;
    match &ov.secret {
        None => Color::from_bytes(v),
        Some(secret) => {
            let colon = v.iter().position(|&b| b == b':')?;
            let (color, given) = (&v[..colon], &v[colon + 1..]);
            constant_time_eq(given, secret.as_bytes())
                .then(|| Color::from_bytes(color))
                .flatten()
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first non-empty value of cookie `name` across all Cookie headers.
pub fn cookie_value<'h>(headers: &'h impl Fields, name: &str) -> Option<&'h [u8]> {
    let name = name.as_bytes();
    for h in headers.values(&http::header::COOKIE) {
        for pair in h.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if pair.len() > name.len() && pair.starts_with(name) && pair[name.len()] == b'=' {
                let v = &pair[name.len() + 1..];
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Power of two choices: among `n` candidates (indices `0..n`), minus
/// `exclude`, draws two distinct ones and returns the one with the lower
/// `load`. `None` when no candidate is left.
#[inline]
pub fn p2c(n: usize, exclude: Option<usize>, load: impl Fn(usize) -> u32) -> Option<usize> {
    let excluded = exclude.filter(|&e| e < n);
    let m = n - excluded.is_some() as usize;
    // Maps 0..m onto 0..n skipping the excluded index.
    let map = |i: usize| match excluded {
        Some(e) if i >= e => i + 1,
        _ => i,
    };
    match m {
        0 => None,
        1 => Some(map(0)),
        _ => {
            // Both draws from one 64-bit random number, each half scaled
            // onto its range (multiply-shift; the bias, m / 2^32, is nil
            // for any pool): one thread-local generator step, not two.
            let r = fastrand::u64(..);
            let scale =
                |half: u64, len: usize| (((half & 0xffff_ffff) * len as u64) >> 32) as usize;
            let a = scale(r, m);
            let mut b = scale(r >> 32, m - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (map(a), map(b));
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderName, HeaderValue};

    fn policy(bp: u16, sticky: Option<Sticky>) -> SplitPolicy {
        SplitPolicy {
            stable: Color::Blue,
            candidate_bp: bp,
            sticky,
            seed: seed_for_salt("gateway"),
            override_: None,
        }
    }

    fn ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    /// XXH3-64 reference values (from the xxHash specification's test
    /// vectors and the C implementation): if these move, stickiness moves.
    #[test]
    fn hash_test_vectors() {
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxh3_64_with_seed(b"", 0), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxh3_64(b"a"), 0xE6C6_32B6_1E96_4E1F);
        assert_eq!(xxh3_64(b"abc"), 0x78AF_5F94_892F_3950);
        // Buckets computed independently with the C library (Python's
        // `xxhash` package): the contract replicas and tools rely on.
        let seed = seed_for_salt("gateway");
        assert_eq!(seed, 0x7BEC_9605_F8DC_863D);
        assert_eq!(bucket(seed, b"user-1"), 9336);
        assert_eq!(bucket(seed, b"user-42"), 7956);
        assert_eq!(bucket(seed, b"alice"), 3101);
        assert_eq!(bucket(seed, &[192, 0, 2, 7]), 8044);
    }

    #[test]
    fn sticky_monotonic_when_share_grows() {
        let sticky = Some(Sticky::Header(HeaderName::from_static("x-user-id")));
        let (p10, p20) = (policy(1000, sticky.clone()), policy(2000, sticky));
        let mut on_green_at_10 = 0;
        for i in 0..20_000 {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user-id",
                HeaderValue::from_str(&format!("user-{i}")).unwrap(),
            );
            let (c10, r) = p10.choose(&h, ip());
            assert_eq!(r, ColorReason::Sticky);
            let (c20, _) = p20.choose(&h, ip());
            if c10 == Color::Green {
                on_green_at_10 += 1;
                assert_eq!(c20, Color::Green, "user-{i} left green when the share grew");
            }
            // Same key, same answer, every time.
            assert_eq!(p10.choose(&h, ip()).0, c10);
        }
        // ~10 % of 20,000 users.
        assert!((1800..2200).contains(&on_green_at_10), "{on_green_at_10}");
    }

    #[test]
    fn draw_follows_the_share() {
        let p = policy(2500, None);
        let h = HeaderMap::new();
        let n = 100_000;
        let green = (0..n)
            .filter(|_| p.choose(&h, ip()).0 == Color::Green)
            .count();
        let share = green as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.01, "{share}");
    }

    #[test]
    fn fixed_shares_never_draw() {
        let h = HeaderMap::new();
        for _ in 0..1000 {
            assert_eq!(
                policy(0, None).choose(&h, ip()),
                (Color::Blue, ColorReason::Fixed)
            );
            assert_eq!(
                policy(10_000, None).choose(&h, ip()),
                (Color::Green, ColorReason::Fixed)
            );
        }
        let mut p = policy(10_000, None);
        p.stable = Color::Green;
        assert_eq!(
            p.choose(&h, ip()).0,
            Color::Blue,
            "percent is always the candidate's"
        );
    }

    #[test]
    fn override_beats_sticky_and_needs_the_secret() {
        let mut p = policy(
            0,
            Some(Sticky::Header(HeaderName::from_static("x-user-id"))),
        );
        p.override_ = Some(OverrideConfig {
            header: HeaderName::from_static("x-cyan-color"),
            secret: None,
        });
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("u1"));
        h.insert("x-cyan-color", HeaderValue::from_static("GREEN"));
        assert_eq!(p.choose(&h, ip()), (Color::Green, ColorReason::Override));
        h.insert("x-cyan-color", HeaderValue::from_static("purple"));
        assert_eq!(p.choose(&h, ip()), (Color::Blue, ColorReason::Fixed));

        p.override_.as_mut().unwrap().secret = Some("s3cret".into());
        h.insert("x-cyan-color", HeaderValue::from_static("green"));
        assert_eq!(p.choose(&h, ip()).0, Color::Blue, "no secret, no override");
        h.insert("x-cyan-color", HeaderValue::from_static("green:wrong"));
        assert_eq!(p.choose(&h, ip()).0, Color::Blue);
        h.insert("x-cyan-color", HeaderValue::from_static("green:s3cret"));
        assert_eq!(p.choose(&h, ip()), (Color::Green, ColorReason::Override));
    }

    #[test]
    fn cookie_and_client_ip_keys() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; sessionx=2"));
        h.append(
            "cookie",
            HeaderValue::from_static("other=3;  session=abc ; z=9"),
        );
        assert_eq!(cookie_value(&h, "session"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&h, "missing"), None);

        let p = policy(5000, Some(Sticky::ClientIp));
        let v4: IpAddr = "203.0.113.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(p.choose(&h, v4).1, ColorReason::Sticky);
        assert_eq!(p.choose(&h, v4).0, p.choose(&h, mapped).0);
        // Missing header key falls back to a draw.
        let p = policy(
            5000,
            Some(Sticky::Header(HeaderName::from_static("x-user-id"))),
        );
        assert_eq!(p.choose(&h, v4).1, ColorReason::Draw);
    }

    #[test]
    fn p2c_prefers_less_loaded_and_honours_exclude() {
        assert_eq!(p2c(0, None, |_| 0), None);
        assert_eq!(p2c(1, None, |_| 0), Some(0));
        assert_eq!(p2c(1, Some(0), |_| 0), None);
        assert_eq!(p2c(2, Some(0), |_| 0), Some(1));
        let loads = [5u32, 0, 5];
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[p2c(3, None, |i| loads[i]).unwrap()] += 1;
        }
        // Endpoint 1 wins every draw it is part of: 2 of 3 pairs.
        assert!(hits[1] > 1800, "{hits:?}");
        for _ in 0..1000 {
            assert_ne!(p2c(3, Some(1), |i| loads[i]), Some(1));
        }
    }

    /// Both draws are uniform and distinct: with the load equal to the
    /// index, the pick is the lower of an unordered pair drawn evenly from
    /// the candidates, so with four the lowest wins 3 of 6 pairs, the next
    /// 2, the third 1 and the highest none. The excluded index is skipped.
    #[test]
    fn p2c_draws_every_pair_evenly() {
        let draws = 24_000;
        for (n, exclude, want) in [
            (4, None, [3.0, 2.0, 1.0, 0.0, 0.0]),
            (5, Some(2), [3.0, 2.0, 0.0, 1.0, 0.0]),
        ] {
            let mut hits = [0u32; 5];
            for _ in 0..draws {
                hits[p2c(n, exclude, |i| i as u32).unwrap()] += 1;
            }
            for (i, w) in want.iter().enumerate() {
                let share = hits[i] as f64 / draws as f64;
                assert!(
                    (share - w / 6.0).abs() < 0.02,
                    "n {n} exclude {exclude:?}: {hits:?}"
                );
            }
        }
    }
}
