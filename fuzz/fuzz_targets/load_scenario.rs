//! Any bytes as a `phoenix load` scenario file: a bounded scenario or an error whose line is
//! inside the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_load::fuzzing::scenario_file(data));
