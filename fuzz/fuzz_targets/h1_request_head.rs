#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cyan::fuzz_targets::h1_request_head(data));
