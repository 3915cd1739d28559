//! Every byte a Serf peer can send in memberlist's format: UDP packets (label, CRC, LZW
//! compression, compound framing) and TCP push-pull streams.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_gossip::{Key, Keyring, memberlist};

fuzz_target!(|data: &[u8]| {
    let keyring = Keyring::new(Key::from_bytes(vec![7; 16]).unwrap());
    let _ = memberlist::parse_packet(data, None);
    let _ = memberlist::parse_packet(data, Some(&keyring));
    let _ = memberlist::read_push_pull(&mut &data[..], None);
    let _ = memberlist::read_push_pull(&mut &data[..], Some(&keyring));
});
