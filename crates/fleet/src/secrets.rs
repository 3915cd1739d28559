//! Secrets' values, from `[secret.NAME]` sources: the operator's environment as it was when
//! `phoenix up` started, or a file read again at each deploy. Values live only in memory
//! here and in the instances' tmpfs; they are never written to the state, the journal, a log
//! or an error message, and `Debug` shows only their length.

use std::collections::BTreeMap;
use std::io::Read;

use phoenix_driver::Secret;

use crate::config::SecretSource;
use crate::{FleetError, FleetFile};

/// The largest secret Phoenix passes (the instances' tmpfs holds 1 MiB).
const MAX_SECRET: u64 = 512 << 10;

/// The environment variables that secrets come from, read once when `phoenix up` starts.
#[derive(Default)]
pub(crate) struct Secrets {
    from_env: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} from the environment)", self.from_env.len())
    }
}

impl Secrets {
    /// Takes the values of every environment-sourced secret of `fleet` now.
    pub fn capture(fleet: &FleetFile) -> Secrets {
        use std::os::unix::ffi::OsStringExt;
        let from_env = fleet
            .secrets
            .values()
            .filter_map(|source| source.env.as_ref())
            .filter_map(|var| Some((var.clone(), std::env::var_os(var)?.into_vec())))
            .collect();
        Secrets { from_env }
    }

    /// The values of secrets `names`, from `fleet`'s sources.
    pub fn values(&self, fleet: &FleetFile, names: &[String]) -> Result<Vec<Secret>, FleetError> {
        names
            .iter()
            .map(|name| {
                let source = fleet.secrets.get(name).ok_or_else(|| FleetError::Secret {
                    name: name.clone(),
                    reason: format!("no [secret.{name}] in {}", fleet.path.display()),
                })?;
                Ok(Secret {
                    name: name.clone(),
                    value: self.value(fleet, name, source)?,
                })
            })
            .collect()
    }

    fn value(
        &self,
        fleet: &FleetFile,
        name: &str,
        source: &SecretSource,
    ) -> Result<Vec<u8>, FleetError> {
        let fail = |reason: String| FleetError::Secret {
            name: name.into(),
            reason,
        };
        if let Some(var) = &source.env {
            return self.from_env.get(var).cloned().ok_or_else(|| {
                fail(format!(
                    "the environment variable {var} was not set when `phoenix up` started"
                ))
            });
        }
        let path = fleet.dir.join(source.file.as_deref().unwrap_or_default());
        let file = std::fs::File::open(&path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        let mut value = Vec::new();
        file.take(MAX_SECRET + 1)
            .read_to_end(&mut value)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        if value.len() as u64 > MAX_SECRET {
            return Err(fail(format!(
                "{} is larger than {} KiB",
                path.display(),
                MAX_SECRET >> 10
            )));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn files_are_read_at_each_call_and_errors_never_show_a_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db.txt"), "first").unwrap();
        let text = r#"
[secret.db]
file = "db.txt"
[secret.token]
env = "PHOENIX_TEST_SECRET_NEVER_SET"
"#;
        let fleet = FleetFile::parse(&dir.path().join("phoenix.toml"), text).unwrap();
        let secrets = Secrets::capture(&fleet);
        let values = secrets.values(&fleet, &["db".into()]).unwrap();
        assert_eq!(values[0].value, b"first");
        std::fs::write(dir.path().join("db.txt"), "second").unwrap();
        assert_eq!(
            secrets.values(&fleet, &["db".into()]).unwrap()[0].value,
            b"second"
        );
        assert!(!format!("{:?}", values[0]).contains("first"));
        let error = secrets
            .values(&fleet, &["token".into()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("PHOENIX_TEST_SECRET_NEVER_SET"), "{error}");
        std::fs::write(dir.path().join("db.txt"), vec![b'x'; 600 << 10]).unwrap();
        let error = secrets
            .values(&fleet, &["db".into()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("larger than 512 KiB"), "{error}");
        assert!(!Path::new(&error).exists());
    }
}
