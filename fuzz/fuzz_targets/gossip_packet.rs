//! Every byte a gossip socket can receive: plain packets, sealed packets with a wrong or right
//! key, and (past decryption) any body for foca or the direct-message decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_gossip::fuzzing::Receiver;

fuzz_target!(|data: &[u8]| {
    let mut receiver = Receiver::new();
    match data.split_first() {
        Some((&mode, rest)) if mode & 0x80 != 0 => receiver.receive_sealed_body(mode, rest),
        Some((&mode, rest)) => receiver.receive(rest, mode & 1 == 1),
        None => receiver.receive(data, false),
    }
});
