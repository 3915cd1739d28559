//! Serf's commands take Go's flags: one dash (`-node x`, `-replay=false`) as well as two. The
//! Serf-compatible subcommands accept both, so scripts written for `serf agent` run as they
//! are: a one-dash word of two letters or more becomes a long flag (these subcommands have
//! no short flags but `-h`), so a misspelt one gets clap's "similar argument" tip. Values
//! that are negative numbers and words after `--` stay as they are.

use std::ffi::OsString;

/// The subcommands that take Serf's one-dash flags.
const SERF_COMMANDS: &[&str] = &[
    "agent",
    "members",
    "event",
    "join",
    "leave",
    "tags",
    "keys",
    "monitor",
    "query",
    "force-leave",
];

/// `args` (the program's, name first) with one-dash long flags of Serf's subcommands doubled.
pub fn normalize(args: Vec<OsString>, command: &clap::Command) -> Vec<OsString> {
    let Some(at) = subcommand_position(&args) else {
        return args;
    };
    let Some(sub) = args[at]
        .to_str()
        .filter(|name| SERF_COMMANDS.contains(name))
        .and_then(|name| command.find_subcommand(name))
    else {
        return args;
    };
    // A flag whose value needs `=` (`-rejoin`, `-replay=false`) never takes the next word.
    let takes_values: Vec<&str> = sub
        .get_arguments()
        .filter(|arg| arg.get_action().takes_values() && !arg.is_require_equals_set())
        .flat_map(|arg| arg.get_long_and_visible_aliases().unwrap_or_default())
        .collect();
    let mut out = args[..=at].to_vec();
    let mut rest = args[at + 1..].iter();
    // The previous word was a flag waiting for its value (`-payload -x` keeps `-x`).
    let mut value_due = false;
    for arg in rest.by_ref() {
        if arg == "--" {
            out.push(arg.clone());
            break;
        }
        let text = arg.to_str().unwrap_or_default();
        let flag = (!value_due).then(|| one_dash_long(text)).flatten();
        let name = flag.or_else(|| text.strip_prefix("--"));
        value_due = !value_due
            && !text.contains('=')
            && name.is_some_and(|name| takes_values.contains(&name));
        out.push(match flag {
            Some(_) => format!("-{text}").into(),
            None => arg.clone(),
        });
    }
    out.extend(rest.cloned());
    out
}

/// Where the subcommand is: the first word that is neither an option nor `--state`'s value.
fn subcommand_position(args: &[OsString]) -> Option<usize> {
    let mut at = 1;
    while at < args.len() {
        match args[at].to_str() {
            Some("--state") => at += 2,
            Some(word) if word.starts_with('-') => at += 1,
            _ => return Some(at),
        }
    }
    None
}

/// The name of a one-dash long flag (`-node`, `-replay=false`), without the dash; `None`
/// for anything else (`-h`, `-1`, `--node`, a value).
fn one_dash_long(text: &str) -> Option<&str> {
    let flag = text.strip_prefix('-')?;
    let name = flag.split_once('=').map_or(flag, |(name, _)| name);
    let word = name.len() > 1 && name.starts_with(|c: char| c.is_ascii_alphabetic());
    word.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(line: &str) -> Vec<String> {
        let args = line.split(' ').map(OsString::from).collect();
        normalize(args, &crate::help::command())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn serfs_one_dash_flags_become_long_flags() {
        assert_eq!(
            normalized(
                "phoenix agent -node n1 -bind=127.0.0.1:7946 -replay=false -config-dir d --tag a=b -x -- -node"
            ),
            [
                "phoenix",
                "agent",
                "--node",
                "n1",
                "--bind=127.0.0.1:7946",
                "--replay=false",
                "--config-dir",
                "d",
                "--tag",
                "a=b",
                "-x",
                "--",
                "-node"
            ]
        );
        // A bare boolean flag leaves the next flag alone.
        assert_eq!(
            normalized("phoenix agent -rejoin -event-handler=x -replay -node n"),
            [
                "phoenix",
                "agent",
                "--rejoin",
                "--event-handler=x",
                "--replay",
                "--node",
                "n"
            ]
        );
        assert_eq!(
            normalized("phoenix --state s members -status alive -tag role=web"),
            [
                "phoenix", "--state", "s", "members", "--status", "alive", "--tag", "role=web"
            ]
        );
        // A misspelt flag becomes a long one, for clap's tip; values stay as they are.
        assert_eq!(
            normalized("phoenix agent -nodee x -retry-max -1 -rpc-auth -secret --tag -k=v"),
            [
                "phoenix",
                "agent",
                "--nodee",
                "x",
                "--retry-max",
                "-1",
                "--rpc-auth",
                "-secret",
                "--tag",
                "-k=v"
            ]
        );
        // Other commands stay as they are.
        assert_eq!(normalized("phoenix up -node"), ["phoenix", "up", "-node"]);
    }
}
