//! `[hooks]`: commands run at points of every deploy.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::timeout;

/// The points of a deploy where a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before the image is baked or chosen; a failure stops the deploy.
    BeforeBake,
    /// After the image is baked and verified (or chosen); a failure stops the deploy.
    AfterVerify,
    /// With the new generation healthy, before traffic moves; a failure vetoes the switch.
    BeforeSwitch,
    /// After the switch; a failure is reported only.
    AfterSwitch,
    /// After a deploy was aborted; a failure is reported only.
    OnAbort,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::BeforeBake => "before_bake",
            Hook::AfterVerify => "after_verify",
            Hook::BeforeSwitch => "before_switch",
            Hook::AfterSwitch => "after_switch",
            Hook::OnAbort => "on_abort",
        }
    }

    /// Whether the hook's failure stops the deploy.
    pub fn may_veto(self) -> bool {
        matches!(
            self,
            Hook::BeforeBake | Hook::AfterVerify | Hook::BeforeSwitch
        )
    }
}

/// The hooks' commands (program and arguments, no shell) and their time limit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default)]
    before_bake: Option<Vec<String>>,
    #[serde(default)]
    after_verify: Option<Vec<String>>,
    #[serde(default)]
    before_switch: Option<Vec<String>>,
    #[serde(default)]
    after_switch: Option<Vec<String>>,
    #[serde(default)]
    on_abort: Option<Vec<String>>,
    /// How long a hook may run before it is killed (and counted as failed).
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl HooksConfig {
    /// The command of `hook`, if one is set.
    pub fn command(&self, hook: Hook) -> Option<&[String]> {
        match hook {
            Hook::BeforeBake => self.before_bake.as_deref(),
            Hook::AfterVerify => self.after_verify.as_deref(),
            Hook::BeforeSwitch => self.before_switch.as_deref(),
            Hook::AfterSwitch => self.after_switch.as_deref(),
            Hook::OnAbort => self.on_abort.as_deref(),
        }
    }

    /// Whether no hook is set.
    pub fn is_empty(&self) -> bool {
        [
            Hook::BeforeBake,
            Hook::AfterVerify,
            Hook::BeforeSwitch,
            Hook::AfterSwitch,
            Hook::OnAbort,
        ]
        .into_iter()
        .all(|hook| self.command(hook).is_none())
    }

    /// Checks every command and makes programs named by a relative path (`./hooks/x`)
    /// relative to the fleet file's directory `dir`.
    pub(crate) fn check(&mut self, dir: &Path) -> Result<(), String> {
        for (name, command) in [
            ("before_bake", &mut self.before_bake),
            ("after_verify", &mut self.after_verify),
            ("before_switch", &mut self.before_switch),
            ("after_switch", &mut self.after_switch),
            ("on_abort", &mut self.on_abort),
        ] {
            let Some(command) = command else { continue };
            let Some(program) = command.first_mut() else {
                return Err(format!(
                    "`{name}` is empty: write the program and its arguments, like [\"./hooks/{name}\"]"
                ));
            };
            if program.contains('/') {
                let relative: PathBuf = Path::new(program.as_str())
                    .components()
                    .filter(|c| !matches!(c, Component::CurDir))
                    .collect();
                let path = dir.join(relative);
                if !is_executable(&path) {
                    return Err(format!(
                        "`{name}`: {} is not an executable file",
                        path.display()
                    ));
                }
                *program = path.display().to_string();
            }
        }
        Ok(())
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
