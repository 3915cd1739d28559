//! Any bytes as a goss check file: templates, YAML, the schema of every resource type, and
//! every matcher it parses applied to a few values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_check::fuzzing::check_file(data));
