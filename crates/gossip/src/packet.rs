//! Framing of every UDP packet an agent sends: a magic byte, then either the plain message or
//! a nonce and the AES-GCM sealed message. Packets come from the network, so decoding treats
//! every byte as hostile: anything unexpected is a [`Dropped`] reason, counted, never a panic.

use crate::keyring::{Keyring, NONCE_LEN, TAG_LEN};

/// A plain packet: `PLAIN kind body…`.
const PLAIN: u8 = 0xF0;
/// A sealed packet: `SEALED nonce sealed(kind body…)`; the magic byte is authenticated too.
const SEALED: u8 = 0xF1;

/// What a packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A SWIM message for foca (membership, piggybacked broadcasts).
    Swim = 0,
    /// A direct message between two agents (query responses and acks).
    Direct = 1,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("empty or unknown packet")]
    Garbage,
    #[error("truncated packet")]
    Truncated,
    #[error("sealed with a key not in the keyring")]
    WrongKey,
    #[error("plain packet while encryption is on")]
    Unencrypted,
    #[error("sealed packet while encryption is off")]
    Unexpected,
}

/// Frames `body` for the wire, sealing it when there is a keyring.
pub fn encode(kind: Kind, body: &[u8], keyring: Option<&Keyring>) -> Vec<u8> {
    let Some(keyring) = keyring else {
        let mut out = Vec::with_capacity(body.len() + 2);
        out.extend_from_slice(&[PLAIN, kind as u8]);
        out.extend_from_slice(body);
        return out;
    };
    let mut plain = Vec::with_capacity(body.len() + 1);
    plain.push(kind as u8);
    plain.extend_from_slice(body);
    let mut nonce = [0u8; NONCE_LEN];
    // A fresh random nonce per packet: agents share the key, so no counter scheme is safe.
    if getrandom::fill(&mut nonce).is_err() {
        tracing::error!("no OS randomness for a nonce; packet not sent");
        return Vec::new();
    }
    let sealed = keyring.seal(&nonce, &[SEALED], &plain);
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(SEALED);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Unframes a packet: its kind and body.
pub fn decode(packet: &[u8], keyring: Option<&Keyring>) -> Result<(Kind, Vec<u8>), Dropped> {
    let (&magic, rest) = packet.split_first().ok_or(Dropped::Garbage)?;
    let plain = match (magic, keyring) {
        (PLAIN, None) => rest.to_vec(),
        (PLAIN, Some(_)) => return Err(Dropped::Unencrypted),
        (SEALED, None) => return Err(Dropped::Unexpected),
        (SEALED, Some(keyring)) => {
            if rest.len() < NONCE_LEN + TAG_LEN + 1 {
                return Err(Dropped::Truncated);
            }
            let (nonce, sealed) = rest.split_at(NONCE_LEN);
            keyring
                .open(nonce, &[SEALED], sealed)
                .ok_or(Dropped::WrongKey)?
        }
        _ => return Err(Dropped::Garbage),
    };
    let (&kind, _) = plain.split_first().ok_or(Dropped::Truncated)?;
    let kind = match kind {
        0 => Kind::Swim,
        1 => Kind::Direct,
        _ => return Err(Dropped::Garbage),
    };
    Ok((kind, plain[1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Key;

    fn ring(byte: u8) -> Keyring {
        Keyring::new(Key::from_bytes(vec![byte; 32]).unwrap())
    }

    #[test]
    fn round_trips_plain_and_sealed() {
        for keyring in [None, Some(ring(1))] {
            let packet = encode(Kind::Direct, b"body", keyring.as_ref());
            assert_eq!(
                decode(&packet, keyring.as_ref()),
                Ok((Kind::Direct, b"body".to_vec()))
            );
        }
        let sealed = encode(Kind::Swim, b"secret", Some(&ring(1)));
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "the body is encrypted"
        );
    }

    #[test]
    fn bad_packets_are_dropped_with_a_reason() {
        let sealed = encode(Kind::Swim, b"x", Some(&ring(1)));
        assert_eq!(decode(&sealed, Some(&ring(2))), Err(Dropped::WrongKey));
        assert_eq!(decode(&sealed, None), Err(Dropped::Unexpected));
        assert_eq!(
            decode(&sealed[..10], Some(&ring(1))),
            Err(Dropped::Truncated)
        );
        let plain = encode(Kind::Swim, b"x", None);
        assert_eq!(decode(&plain, Some(&ring(1))), Err(Dropped::Unencrypted));
        assert_eq!(decode(b"", None), Err(Dropped::Garbage));
        assert_eq!(decode(b"GET / HTTP/1.1", None), Err(Dropped::Garbage));
        assert_eq!(decode(&[PLAIN], None), Err(Dropped::Truncated));
        assert_eq!(decode(&[PLAIN, 9], None), Err(Dropped::Garbage));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode(&flipped, Some(&ring(1))), Err(Dropped::WrongKey));
    }
}
