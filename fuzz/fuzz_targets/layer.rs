//! Any bytes as an image layer (raw tar or gzip, or entries described byte by byte and
//! written as a well-formed tar) applied over a root whose links point out of it: nothing
//! outside the root may change.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_image::fuzzing::layer(data));
