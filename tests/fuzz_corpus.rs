//! Replays every committed fuzz seed (`fuzz/corpus/<target>/*`) through the
//! same entry points the cargo-fuzz targets use, so `cargo test` keeps the
//! corpus green without nightly or libFuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        run(&data);
        n += 1;
    }
    assert!(n > 0, "no seeds for {target}");
}

#[test]
fn config_seeds() {
    replay("config", cyan::fuzz_targets::config);
}

#[test]
fn admin_request_seeds() {
    replay("admin_request", cyan::fuzz_targets::admin_request);
}

#[test]
fn table_apply_seeds() {
    replay("table_apply", cyan::fuzz_targets::table_apply);
}

#[test]
fn headers_seeds() {
    replay("headers", cyan::fuzz_targets::headers);
}

#[test]
fn h1_request_head_seeds() {
    replay("h1_request_head", cyan::fuzz_targets::h1_request_head);
}

#[test]
fn h1_response_head_seeds() {
    replay("h1_response_head", cyan::fuzz_targets::h1_response_head);
}
