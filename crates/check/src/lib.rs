//! Provisioning checks in goss's format: load a goss YAML or JSON file (templates, includes),
//! run its checks concurrently against this machine or an instance's root, and report in
//! goss's formats.
//!
//! ```no_run
//! use phoenix_check::{Format, FormatOptions, RunOptions, Target, TemplateData, load, render, run};
//! let suite = load("goss.yaml".as_ref(), &TemplateData::default())?;
//! let report = run(&suite, &Target::host(), &RunOptions::default());
//! print!("{}", render(&report, Format::Rspecish, &FormatOptions::default(), false));
//! # Ok::<(), phoenix_check::SuiteError>(())
//! ```

mod duration;
mod kind;
mod matcher;
mod probe;
mod report;
mod run;
mod sprig;
mod suite;
mod template;
mod yaml;

pub use duration::go_duration;
pub use probe::net::interface_ips;

use std::path::PathBuf;

/// The parsing entry point for `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use serde_json::json;

    use crate::TemplateData;

    /// Parses arbitrary bytes as a goss file and applies every parsed matcher to a few values.
    pub fn check_file(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let vars = TemplateData {
            vars: json!({"port": 80, "name": "x"}),
            env: [("HOME".to_string(), "/root".to_string())].into(),
        };
        let path = std::path::Path::new("/nonexistent/fuzz/goss.yaml");
        if let Ok(checks) = crate::suite::parse_text(path, &text, &vars) {
            for attribute in checks.iter().flat_map(|c| &c.attributes) {
                for value in [json!("a\nb"), json!(3), json!(["a", 1]), json!({"k": true})] {
                    let _ = attribute.matcher.matches(&value);
                }
            }
        }
    }
}

pub use kind::Kind;
pub use probe::Target;
pub use report::{Format, FormatOptions, describe, render};
pub use run::{Outcome, Report, RunOptions, Status, run};
pub use suite::{Check, Suite, digest_of, load, load_vars, merge_vars, parse_vars};
pub use template::TemplateData;

/// A goss file that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}
