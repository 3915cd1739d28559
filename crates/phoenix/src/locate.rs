//! Where the state directory and the fleet file are when the command line does not say: found
//! from any subdirectory, as git finds `.git`.

use std::path::{Path, PathBuf};

/// The default name of the state directory, beside the fleet file.
pub const STATE_DIR: &str = ".phoenix";
/// The default name of the fleet file.
pub const FLEET_FILE: &str = "phoenix.toml";

/// `--state` (or `PHOENIX_STATE`) as given; else, walking up from the current directory, the
/// first directory holding a `.phoenix` directory or a `phoenix.toml` gives its `.phoenix`;
/// else `./.phoenix`.
pub fn state_dir(given: Option<&Path>) -> PathBuf {
    if let Some(given) = given {
        return given.to_path_buf();
    }
    let found = std::env::current_dir().ok().and_then(|cwd| {
        cwd.ancestors()
            .find(|dir| dir.join(STATE_DIR).is_dir() || dir.join(FLEET_FILE).is_file())
            .map(|dir| dir.join(STATE_DIR))
    });
    found.unwrap_or_else(|| PathBuf::from(STATE_DIR))
}

/// `-f FILE` as given; else the nearest `phoenix.toml`, walking up from the current directory;
/// else `phoenix.toml` (whose absence the loader reports).
pub fn fleet_file(given: Option<&Path>) -> PathBuf {
    if let Some(given) = given {
        return given.to_path_buf();
    }
    let found = std::env::current_dir().ok().and_then(|cwd| {
        cwd.ancestors()
            .map(|dir| dir.join(FLEET_FILE))
            .find(|file| file.is_file())
    });
    found.unwrap_or_else(|| PathBuf::from(FLEET_FILE))
}
