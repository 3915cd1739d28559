//! Provisioning checks in goss's format: load a goss YAML or JSON file (templates, includes),
//! run its checks concurrently against this machine or an instance's root, and report in
//! goss's formats.
//!
//! ```no_run
//! use phoenix_check::{Format, RunOptions, Target, TemplateData, load, render, run};
//! let suite = load("goss.yaml".as_ref(), &TemplateData::default())?;
//! let report = run(&suite, &Target::host(), &RunOptions::default());
//! print!("{}", render(&report, Format::Documentation, false));
//! # Ok::<(), phoenix_check::SuiteError>(())
//! ```

mod kind;
mod matcher;
mod probe;
mod report;
mod run;
mod suite;
mod template;
mod yaml;

use std::path::PathBuf;

pub use kind::Kind;
pub use probe::Target;
pub use report::{Format, describe, render};
pub use run::{Outcome, Report, RunOptions, Status, run};
pub use suite::{Check, Suite, load, load_vars};
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
