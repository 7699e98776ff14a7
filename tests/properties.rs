//! Property tests: invariants that must hold for any input, not just the
//! examples the scenario tests chose.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use cyan::config::{Color, Config, Sticky};
use cyan::metrics::Metrics;
use cyan::split::{seed_for_salt, SplitPolicy};
use cyan::table::{Applied, Change, Command, RoutingTable, Table};

const BASE: &str = r#"
[[listener]]
name = "l"
listen = "127.0.0.1:0"

[[service]]
name = "gateway"
candidate_percent = 10
blue  = { endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"] }
green = { endpoints = ["127.0.0.1:9001"] }

[[service]]
name = "api"
hosts = ["api.example.com"]
blue  = { endpoints = ["127.0.0.1:8101"] }
green = { endpoints = ["127.0.0.1:9101"] }
"#;

/// Everything dynamic about a table, to compare before and after.
fn dynamic_state(t: &RoutingTable) -> Vec<String> {
    let mut v = vec![format!("gen {}", t.generation)];
    for s in &t.services {
        v.push(format!(
            "{} {:?} {} {:?} {:?}",
            s.name,
            s.split.stable,
            s.split.candidate_bp,
            s.rollout,
            s.rolled_back.as_ref().map(|l| &l.reason)
        ));
        for p in &s.pools {
            for e in &p.endpoints {
                v.push(format!(
                    "  {:?} {} {} {}",
                    p.color, e.addr, e.healthy, e.drained
                ));
            }
            v.push(format!("  eligible {:?}", p.eligible));
        }
    }
    v
}

fn service_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "gateway".prop_map(String::from),
        "api".prop_map(String::from),
        "[a-z]{1,6}"
    ]
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        Just("127.0.0.1:8001".parse().unwrap()),
        Just("127.0.0.1:8002".parse().unwrap()),
        Just("127.0.0.1:9001".parse().unwrap()),
        Just("127.0.0.1:8101".parse().unwrap()),
        (1u16..65535).prop_map(|p| SocketAddr::from(([127, 0, 0, 2], p))),
    ]
}

fn color() -> impl Strategy<Value = Color> {
    prop_oneof![Just(Color::Blue), Just(Color::Green)]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (service_name(), 0u16..12_000).prop_map(|(service, candidate_bp)| Command::SetSplit {
            service,
            candidate_bp
        }),
        service_name().prop_map(|service| Command::Promote { service }),
        service_name().prop_map(|service| Command::Rollback { service }),
        (service_name(), addr(), any::<bool>()).prop_map(|(service, addr, drained)| {
            Command::SetDrained {
                service,
                addr,
                drained,
            }
        }),
        (service_name(), color(), addr(), any::<bool>()).prop_map(
            |(service, color, addr, healthy)| Command::SetHealth {
                service,
                color,
                addr,
                healthy
            }
        ),
        (service_name(), 0u16..12_000, "[a-z ]{0,12}").prop_map(|(service, to_bp, reason)| {
            Command::AutoRollback {
                service,
                to_bp,
                reason,
                at_ms: 1,
            }
        }),
        (
            service_name(),
            proptest::collection::vec(1u16..10_001, 0..4)
        )
            .prop_map(|(service, steps)| Command::RolloutStart {
                service,
                steps,
                at_ms: 1
            }),
        (service_name(), 0usize..5).prop_map(|(service, step)| Command::RolloutAdvance {
            service,
            step,
            at_ms: 2
        }),
        service_name().prop_map(|service| Command::RolloutPause { service, at_ms: 3 }),
        service_name().prop_map(|service| Command::RolloutResume { service, at_ms: 4 }),
        service_name().prop_map(|service| Command::RolloutAbort {
            service,
            reason: "x".into()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A rejected command never changes the table; an accepted one moves the
    /// generation by exactly one; "no change" changes nothing.
    #[test]
    fn rejected_commands_change_nothing(
        cmds in proptest::collection::vec((command(), proptest::option::of(0u64..8)), 1..40)
    ) {
        let cfg = Config::parse(BASE).unwrap();
        let table = Table::new(&cfg, Metrics::new()).unwrap();
        for (cmd, if_gen) in cmds {
            let before = table.load();
            let snapshot = dynamic_state(&before);
            match table.apply(Change::from(cmd.clone()).if_generation(if_gen)) {
                Err(_) => prop_assert_eq!(dynamic_state(&table.load()), snapshot, "{:?} was refused but changed the table", cmd),
                Ok(Applied::NoChange { generation }) => {
                    prop_assert_eq!(generation, before.generation);
                    prop_assert_eq!(dynamic_state(&table.load()), snapshot);
                }
                Ok(Applied::Changed { generation }) => prop_assert_eq!(generation, before.generation + 1),
            }
            // Invariants of every live table.
            let t = table.load();
            for s in &t.services {
                prop_assert!(s.split.candidate_bp <= 10_000);
                for p in &s.pools {
                    for &i in &p.eligible {
                        prop_assert!(p.endpoints[i].healthy && !p.endpoints[i].drained);
                    }
                    let n = p.endpoints.iter().filter(|e| e.healthy && !e.drained).count();
                    prop_assert_eq!(n, p.eligible.len());
                }
            }
        }
    }

    /// Raising the candidate's share only ever moves a key to the candidate.
    #[test]
    fn stickiness_is_monotonic(
        key in proptest::collection::vec(any::<u8>(), 1..64),
        salt in "[a-z0-9-]{1,16}",
        a in 0u16..=10_000,
        b in 0u16..=10_000,
        stable in color(),
    ) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let name = HeaderName::from_static("x-user-id");
        let mut h = HeaderMap::new();
        let Ok(v) = HeaderValue::from_bytes(&key) else { return Ok(()) };
        h.insert(name.clone(), v);
        let policy = |bp| SplitPolicy {
            stable,
            candidate_bp: bp,
            sticky: Some(Sticky::Header(name.clone())),
            seed: seed_for_salt(&salt),
            override_: None,
        };
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let (c_lo, _) = policy(lo).choose(&h, ip);
        let (c_hi, _) = policy(hi).choose(&h, ip);
        if c_lo == stable.other() {
            prop_assert_eq!(c_hi, stable.other(), "key left the candidate going from {} to {} bp", lo, hi);
        }
        // The same key, share and salt always give the same color.
        prop_assert_eq!(policy(lo).choose(&h, ip).0, c_lo);
    }

    /// Generated configs survive a TOML round trip with their meaning intact.
    #[test]
    fn configs_round_trip(
        services in proptest::collection::vec(
            ("[a-z][a-z0-9-]{0,10}", 0u16..=10_000, 1usize..4, 1usize..4, any::<bool>(), proptest::option::of("[a-z-]{1,12}")),
            1..5,
        )
    ) {
        let mut text = String::from("[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n");
        let mut seen = std::collections::HashSet::new();
        let mut expect = Vec::new();
        for (i, (name, bp, nb, ng, green_stable, sticky)) in services.iter().enumerate() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let percent = format!("{}.{:02}", bp / 100, bp % 100);
            let list = |base: u16, n: usize| (0..n).map(|k| format!("\"127.0.0.1:{}\"", base + k as u16)).collect::<Vec<_>>().join(", ");
            text.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nhosts = [\"s{i}.example\"]\nstable = \"{}\"\ncandidate_percent = {percent}\n{}blue = {{ endpoints = [{}] }}\ngreen = {{ endpoints = [{}] }}\n",
                if *green_stable { "green" } else { "blue" },
                sticky.as_ref().map(|h| format!("sticky = {{ header = \"{h}\" }}\n")).unwrap_or_default(),
                list(10_000 + i as u16 * 10, *nb),
                list(20_000 + i as u16 * 10, *ng),
            ));
            expect.push((name.clone(), *bp, *nb, *ng, *green_stable, sticky.clone()));
        }
        let cfg = Config::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(cfg.services.len(), expect.len());
        for (s, (name, bp, nb, ng, green_stable, sticky)) in cfg.services.iter().zip(expect) {
            prop_assert_eq!(&s.name, &name);
            prop_assert_eq!(s.candidate_bp, bp);
            prop_assert_eq!(s.blue.endpoints.len(), nb);
            prop_assert_eq!(s.green.endpoints.len(), ng);
            prop_assert_eq!(s.stable, if green_stable { Color::Green } else { Color::Blue });
            prop_assert_eq!(s.sticky.is_some(), sticky.is_some());
        }
    }

    /// Arbitrary text never panics the config parser: it is either a config
    /// or a list of problems.
    #[test]
    fn config_parser_never_panics(text in "\\PC{0,400}") {
        let _ = Config::parse(&text);
        let mutated = BASE.replacen("10", &text.chars().take(8).collect::<String>(), 1);
        let _ = Config::parse(&mutated);
    }
}
