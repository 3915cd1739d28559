//! Every byte a Serf peer can send in memberlist's format: UDP packets (label, CRC, LZW
//! compression, compound framing) and TCP streams (push-pulls, and the pings and acks of the
//! fallback probe).
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_gossip::{Key, Keyring, memberlist};

fuzz_target!(|data: &[u8]| {
    let keyring = Keyring::new(Key::from_bytes(vec![7; 16]).unwrap());
    let _ = memberlist::parse_packet(data, None);
    let _ = memberlist::parse_packet(data, Some(&keyring));
    let _ = memberlist::read_stream(&mut &data[..], None);
    let _ = memberlist::read_stream(&mut &data[..], Some(&keyring));
});
