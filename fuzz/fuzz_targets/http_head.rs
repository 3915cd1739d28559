//! Any bytes as an HTTP/1.1 request or response head on the proxy's fast path: what it
//! forwards always parses back whole, with the headers it must carry.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| phoenix_proxy::fuzzing::heads(data));
