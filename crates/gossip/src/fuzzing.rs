//! The receive path of an agent without its socket, for `cargo fuzz` (see `fuzz/`): the same
//! unframing, decryption, direct-message decoding and foca decoding a packet from the network
//! goes through. Not part of the API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use foca::{Foca, PostcardCodec};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::agent::{Swim, Unframed, unframe};
use crate::broadcast::{EventLog, Handler};
use crate::health::Io;
use crate::identity::NodeId;
use crate::keyring::{Key, Keyring};
use crate::packet::{self, Kind};

/// An agent's receiving half with a few known members.
pub struct Receiver {
    foca: Swim,
    runtime: Io,
    keyring: Keyring,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    pub fn new() -> Self {
        let id = |name: &str, port: u16| NodeId {
            name: name.into(),
            addr: ([127, 0, 0, 1], port).into(),
            bump: 1,
            tags: BTreeMap::from([("role".to_string(), "web".to_string())]),
            leaving: false,
        };
        let mut foca = Foca::with_custom_broadcast(
            id("me", 1),
            foca::Config::new_lan(std::num::NonZeroU32::MIN),
            SmallRng::seed_from_u64(1),
            PostcardCodec,
            Handler(Arc::new(Mutex::new(EventLog::default()))),
        );
        let mut runtime = Io::default();
        let known = [id("a", 2), id("b", 3)].map(foca::Member::alive);
        let _ = foca.apply_many(known.into_iter(), false, &mut runtime);
        let keyring = Keyring::new(Key::from_bytes(vec![7; 32]).unwrap_or_else(|_| unreachable!()));
        Receiver {
            foca,
            runtime,
            keyring,
        }
    }

    /// Takes `bytes` as a packet off the wire: plain, or sealed when `sealed` (with the key
    /// this receiver holds, so the fuzzer reaches what decryption protects).
    pub fn receive(&mut self, bytes: &[u8], sealed: bool) {
        let keyring = sealed.then_some(&self.keyring);
        if let Unframed::Swim(body) = unframe(bytes, keyring) {
            let _ = self.foca.handle_data(&body, &mut self.runtime);
        }
        // Drop what foca asked for: nothing is sent or scheduled here.
        self.runtime = Io::default();
    }

    /// Seals `body` as a packet of `kind` (0 SWIM, 1 direct) and receives it.
    pub fn receive_sealed_body(&mut self, kind: u8, body: &[u8]) {
        let kind = if kind.is_multiple_of(2) {
            Kind::Swim
        } else {
            Kind::Direct
        };
        let packet = packet::encode(kind, body, Some(&self.keyring));
        self.receive(&packet, true);
    }
}

/// `len` pseudo-random bytes (xorshift64, from and advancing `seed`): deterministic junk for
/// tests that throw garbage at the receive path.
pub fn junk(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_bytes_go_through_without_a_panic() {
        let mut receiver = Receiver::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000 {
            let bytes = junk(&mut seed, len % 300);
            receiver.receive(&bytes, len % 3 == 0);
            receiver.receive_sealed_body(len as u8, &bytes);
        }
    }
}
