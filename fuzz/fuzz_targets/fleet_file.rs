//! Any bytes as a fleet file: a value or an error whose line and column are inside the file,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_fleet::fuzzing::fleet_file(data));
