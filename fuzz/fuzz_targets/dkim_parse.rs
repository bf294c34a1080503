#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ringmx::fuzz_targets::dkim_parse(data));
