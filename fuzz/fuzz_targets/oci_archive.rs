//! Any bytes as an OCI archive given to `phoenix import`, read into a store inside a root whose
//! links point out of it: nothing outside the root may change.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_image::fuzzing::archive(data));
