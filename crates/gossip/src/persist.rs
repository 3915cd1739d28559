//! The files an agent keeps across restarts beside its snapshot, in Serf's formats: the
//! keyring (`keyring_file`: a JSON list of base64 keys, primary first) and the tags
//! (`tags_file`: a JSON object). Both are written with mode 0600, atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::keyring::{Key, KeyError, Keyring};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a JSON {what}: {source}", path.display())]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: key {index}: {source}", path.display())]
    Key {
        path: PathBuf,
        index: usize,
        #[source]
        source: KeyError,
    },
    #[error("{}: the keyring file contains no keys", .0.display())]
    NoKeys(PathBuf),
    #[error(
        "{}: mode {mode:o} lets other users read the keys: `chmod 600` it",
        path.display()
    )]
    Readable { path: PathBuf, mode: u32 },
}

impl Keyring {
    /// Reads a keyring file (it must exist, as Serf's must, and be its owner's alone).
    pub fn load_file(path: &Path) -> Result<Keyring, FileError> {
        let io = |source| FileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(FileError::Readable {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read(path).map_err(io)?;
        let encoded: Vec<String> =
            serde_json::from_slice(&text).map_err(|source| FileError::Json {
                path: path.to_path_buf(),
                what: "list of base64 keys",
                source,
            })?;
        let mut keys = encoded.iter().enumerate().map(|(index, text)| {
            Key::from_base64(text).map_err(|source| FileError::Key {
                path: path.to_path_buf(),
                index,
                source,
            })
        });
        let primary = keys
            .next()
            .ok_or_else(|| FileError::NoKeys(path.to_path_buf()))??;
        let mut keyring = Keyring::new(primary);
        for key in keys {
            keyring.install(key?);
        }
        Ok(keyring)
    }

    /// Writes the keyring as Serf does: its keys in base64, primary first.
    pub fn save_file(&self, path: &Path) -> Result<(), FileError> {
        let encoded: Vec<String> = self.keys().iter().map(Key::to_base64).collect();
        write_private(path, &to_json(&encoded))
    }
}

/// Reads a tags file; a missing one is `None` (Serf starts with no tags and writes it later).
pub fn load_tags(path: &Path) -> Result<Option<BTreeMap<String, String>>, FileError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| FileError::Json {
            path: path.to_path_buf(),
            what: "object of string tags",
            source,
        })
}

pub fn save_tags(path: &Path, tags: &BTreeMap<String, String>) -> Result<(), FileError> {
    write_private(path, &to_json(tags))
}

fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
    // Maps of strings and lists of strings always serialize.
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

/// Writes `bytes` to `path` through a 0600 temporary file renamed over it.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().map_err(|source| FileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("phoenix-persist-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_keyring_round_trips_primary_first_and_bad_files_are_named() {
        let dir = dir("keyring");
        let path = dir.join("keyring");
        let (a, b) = (
            Key::from_bytes(vec![1; 32]).unwrap(),
            Key::from_bytes(vec![2; 16]).unwrap(),
        );
        let mut ring = Keyring::new(a.clone());
        ring.install(b.clone());
        ring.use_key(&b).unwrap();
        ring.save_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&text).unwrap(),
            vec![b.to_base64(), a.to_base64()]
        );
        assert_eq!(Keyring::load_file(&path).unwrap(), ring);

        std::fs::write(&path, "[]").unwrap();
        let error = Keyring::load_file(&path).unwrap_err().to_string();
        assert!(error.contains("contains no keys"), "{error}");
        std::fs::write(&path, "[\"aGVsbG8=\"]").unwrap();
        let error = Keyring::load_file(&path).unwrap_err().to_string();
        assert!(
            error.contains("key 0") && error.contains("not 5"),
            "{error}"
        );
        std::fs::write(&path, "{").unwrap();
        let error = Keyring::load_file(&path).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{}: not a JSON", path.display())),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Keyring::load_file(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        assert!(Keyring::load_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tags_round_trip_and_a_missing_file_is_none() {
        let dir = dir("tags");
        let path = dir.join("tags.json");
        assert_eq!(load_tags(&path).unwrap(), None);
        let tags = BTreeMap::from([("role".to_string(), "web".to_string())]);
        save_tags(&path, &tags).unwrap();
        assert_eq!(load_tags(&path).unwrap(), Some(tags));
        std::fs::write(&path, "{\"role\": 1}").unwrap();
        assert!(
            load_tags(&path)
                .unwrap_err()
                .to_string()
                .contains("object of string tags")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
