//! The gossip keyring: AES-GCM keys as Serf has them (16, 24 or 32 bytes, base64 on the command
//! line). Packets are sealed with the primary key and opened with any installed key, so keys
//! rotate without downtime: install the new key everywhere, make it primary everywhere, then
//! remove the old one.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm, Nonce};
use base64::Engine;

type Aes192Gcm = AesGcm<aes_gcm::aes::Aes192, aes_gcm::aead::consts::U12>;

/// Bytes of a nonce, sent in front of every sealed packet.
pub const NONCE_LEN: usize = 12;
/// Bytes the authentication tag adds.
pub const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key must be 16, 24 or 32 bytes (AES-128, -192 or -256), not {0}")]
    Length(usize),
    #[error("key {0} is not installed")]
    NotInstalled(String),
    #[error("key {0} is the primary key; make another key primary first")]
    RemovePrimary(String),
    #[error("the operating system gave no random bytes for a key")]
    Random,
}

/// One AES-GCM key.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "Key(AES-{})", self.bytes.len() * 8)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Key {
    /// Parses a base64 key, as `serf keygen` prints them.
    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        Key::from_bytes(bytes)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Key, KeyError> {
        match bytes.len() {
            16 | 24 | 32 => Ok(Key { bytes }),
            n => Err(KeyError::Length(n)),
        }
    }

    /// A new random 32-byte key (AES-256), from the operating system's generator.
    pub fn generate() -> Result<Key, KeyError> {
        let mut bytes = vec![0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| KeyError::Random)?;
        Key::from_bytes(bytes)
    }

    /// The key itself.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = Nonce::from_slice(nonce);
        let payload = Payload { msg: plain, aad };
        let sealed = match self.bytes.len() {
            16 => Aes128Gcm::new_from_slice(&self.bytes).map(|c| c.encrypt(nonce, payload)),
            24 => Aes192Gcm::new_from_slice(&self.bytes).map(|c| c.encrypt(nonce, payload)),
            _ => Aes256Gcm::new_from_slice(&self.bytes).map(|c| c.encrypt(nonce, payload)),
        };
        // Lengths are checked when the key is made; encryption of a slice cannot fail.
        sealed.ok().and_then(Result::ok).unwrap_or_default()
    }

    fn open(&self, nonce: &[u8], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let nonce = Nonce::from_slice(nonce);
        let payload = Payload { msg: sealed, aad };
        match self.bytes.len() {
            16 => Aes128Gcm::new_from_slice(&self.bytes)
                .ok()?
                .decrypt(nonce, payload),
            24 => Aes192Gcm::new_from_slice(&self.bytes)
                .ok()?
                .decrypt(nonce, payload),
            _ => Aes256Gcm::new_from_slice(&self.bytes)
                .ok()?
                .decrypt(nonce, payload),
        }
        .ok()
    }
}

/// The installed keys; the first is the primary (used to seal).
#[derive(Debug, Clone, PartialEq)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(primary: Key) -> Self {
        Keyring {
            keys: vec![primary],
        }
    }

    /// Installs a key for opening packets (it does not become primary).
    pub fn install(&mut self, key: Key) {
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
    }

    /// Makes an installed key the primary one.
    pub fn use_key(&mut self, key: &Key) -> Result<(), KeyError> {
        let at = self
            .keys
            .iter()
            .position(|k| k == key)
            .ok_or_else(|| KeyError::NotInstalled(key.to_base64()))?;
        let key = self.keys.remove(at);
        self.keys.insert(0, key);
        Ok(())
    }

    pub fn remove(&mut self, key: &Key) -> Result<(), KeyError> {
        match self.keys.iter().position(|k| k == key) {
            Some(0) => Err(KeyError::RemovePrimary(key.to_base64())),
            Some(at) => {
                self.keys.remove(at);
                Ok(())
            }
            None => Err(KeyError::NotInstalled(key.to_base64())),
        }
    }

    /// The installed keys, primary first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        self.keys[0].seal(nonce, aad, plain)
    }

    /// Opens a packet sealed with any installed key.
    pub fn open(&self, nonce: &[u8], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if nonce.len() != NONCE_LEN || sealed.len() < TAG_LEN {
            return None;
        }
        self.keys.iter().find_map(|k| k.open(nonce, aad, sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8, len: usize) -> Key {
        Key::from_bytes(vec![byte; len]).unwrap()
    }

    #[test]
    fn keys_parse_from_base64_of_the_three_aes_sizes() {
        for len in [16, 24, 32] {
            let k = key(7, len);
            assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        }
        assert_eq!(Key::from_base64("aGVsbG8="), Err(KeyError::Length(5)));
        assert!(matches!(
            Key::from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(format!("{:?}", key(1, 32)), "Key(AES-256)");
    }

    #[test]
    fn rotation_keeps_old_packets_readable_until_the_old_key_is_removed() {
        let (old, new) = (key(1, 16), key(2, 32));
        let nonce = [9; NONCE_LEN];
        let mut ring = Keyring::new(old.clone());
        let sealed_old = ring.seal(&nonce, b"v1", b"hello");
        ring.install(new.clone());
        ring.use_key(&new).unwrap();
        let sealed_new = ring.seal(&nonce, b"v1", b"hello");
        assert_ne!(sealed_old, sealed_new);
        assert_eq!(ring.open(&nonce, b"v1", &sealed_old).unwrap(), b"hello");
        assert_eq!(ring.open(&nonce, b"v1", &sealed_new).unwrap(), b"hello");
        assert_eq!(
            ring.open(&nonce, b"v2", &sealed_new),
            None,
            "aad is authenticated"
        );
        assert_eq!(
            ring.remove(&new),
            Err(KeyError::RemovePrimary(new.to_base64()))
        );
        ring.remove(&old).unwrap();
        assert_eq!(ring.open(&nonce, b"v1", &sealed_old), None);
        assert_eq!(ring.open(&nonce, b"v1", &sealed_new).unwrap(), b"hello");
    }
}
