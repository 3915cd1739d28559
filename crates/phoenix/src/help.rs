//! `phoenix --help` with its commands in groups, shell completions (clap_complete) and man
//! pages (clap_mangen), all from the one command definition.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

/// Every command, in the group `--help` lists it under.
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "Fleet",
        &[
            "up",
            "restart",
            "upgrade",
            "plan",
            "apply",
            "deploy",
            "rollback",
            "scale",
            "protect",
            "standby",
            "status",
            "host",
            "review",
            "dashboard",
            "logs",
            "history",
            "metrics",
            "top",
            "exec",
            "state",
        ],
    ),
    (
        "Images",
        &[
            "bake", "images", "image", "verify", "drift", "export", "import", "gc",
        ],
    ),
    (
        "Cluster and gossip",
        &[
            "agent",
            "members",
            "event",
            "query",
            "join",
            "leave",
            "force-leave",
            "tags",
            "keys",
            "keygen",
            "monitor",
        ],
    ),
    (
        "Tools",
        &["demo", "load", "proxy", "tls", "completions", "man"],
    ),
];

/// The top-level command with its help listing the commands by group.
pub fn command() -> clap::Command {
    let command = crate::Cli::command();
    let width = GROUPS
        .iter()
        .flat_map(|(_, names)| names.iter())
        .map(|name| name.len())
        .max()
        .unwrap_or(0);
    let mut listing = String::new();
    for (group, names) in GROUPS {
        listing.push_str(&format!("{group}:\n"));
        for name in *names {
            let about = command
                .find_subcommand(name)
                .and_then(|sub| sub.get_about())
                .map(|about| about.to_string())
                .unwrap_or_default();
            listing.push_str(&format!("  {name:<width$}  {about}\n"));
        }
        listing.push('\n');
    }
    command.help_template(format!(
        "{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{listing}Options:\n{{options}}{{after-help}}"
    ))
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Prints the completion script for a shell.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = command();
    // Into memory first: clap_complete panics when its writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "phoenix", &mut script);
    print_all(&script)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write `phoenix.1` and one `phoenix-COMMAND.1` per command into this directory
    /// (default: print `phoenix.1`).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Man pages in roff.
pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let command = command();
    let Some(dir) = args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        return print_all(&page);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut pages = vec![("phoenix".to_string(), command.clone())];
    for sub in command.get_subcommands() {
        let name = format!("phoenix-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page).render(&mut bytes)?;
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    }
    println!("man pages written to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_in_exactly_one_group() {
        let command = crate::Cli::command();
        let mut grouped: Vec<&str> = GROUPS.iter().flat_map(|(_, n)| n.iter().copied()).collect();
        let total = grouped.len();
        grouped.sort();
        grouped.dedup();
        assert_eq!(grouped.len(), total, "a command is listed twice");
        let mut commands: Vec<&str> = command.get_subcommands().map(|c| c.get_name()).collect();
        commands.sort();
        assert_eq!(grouped, commands);
    }

    #[test]
    fn help_lists_groups_with_each_commands_summary() {
        let help = command().render_help().to_string();
        let fleet = help.find("Fleet:").unwrap();
        let images = help.find("Images:").unwrap();
        let cluster = help.find("Cluster and gossip:").unwrap();
        let tools = help.find("Tools:").unwrap();
        assert!(
            fleet < images && images < cluster && cluster < tools,
            "{help}"
        );
        let deploy = help
            .lines()
            .find(|l| l.trim_start().starts_with("deploy "))
            .unwrap();
        assert!(deploy.contains("blue-green"), "{deploy}");
        assert!(help.contains("--state"), "{help}");
        assert!(
            !help.contains("--log"),
            "--log belongs to up, demo, agent and proxy: {help}"
        );
    }
}
