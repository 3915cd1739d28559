//! Every byte a Serf peer can send in memberlist's format: UDP packets (label, CRC, LZW
//! compression, compound framing) and TCP push-pull streams.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_gossip::memberlist;

fuzz_target!(|data: &[u8]| {
    let _ = memberlist::parse_packet(data);
    let _ = memberlist::read_push_pull(&mut &data[..]);
});
