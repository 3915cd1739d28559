//! Event handler scripts (`--event-handler [TYPE=]SCRIPT`), run as Serf runs them: Serf's
//! environment (with `PHOENIX_*` aliases), member lines or the payload on stdin, and for a
//! query, the script's output (stdout and stderr, as Serf) as the answer. Scripts run off the gossip path: a slow one
//! delays other scripts, never the agent; queries run at once, each in its own task, since
//! their answers have a deadline.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use phoenix_gossip::coalesce::{Batch, Coalescer};
use phoenix_gossip::rpc::EventFilter;
use phoenix_gossip::{Agent, Event, Member, QueryEvent};
use tokio::io::AsyncWriteExt;

/// Most bytes of a script's output kept for a query's answer: the last 8 KiB, as Serf keeps
/// them (the answer itself must fit the response limit).
const MAX_OUTPUT: usize = 8 * 1024;

/// One `--event-handler`.
pub struct Handler {
    filter: EventFilter,
    script: String,
}

impl Handler {
    /// Serf's rule: what precedes the first `=` is the event filter, and it must be a valid
    /// one (`bogus-event=x` is refused, as `serf agent` refuses it); without `=`, the whole is
    /// the script, for every event.
    pub fn parse(spec: &str) -> Result<Handler> {
        let (kinds, script) = spec.split_once('=').unwrap_or(("*", spec));
        let filter =
            EventFilter::parse(kinds).map_err(|e| anyhow!("Invalid event script: {spec} ({e})"))?;
        if script.trim().is_empty() {
            bail!("Invalid event script: {spec} (no script)");
        }
        Ok(Handler {
            filter,
            script: script.to_string(),
        })
    }

    /// The handler as Serf's `info` lists it: `EVENT:NAME` to the script, per filter part.
    pub fn info_entries(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.filter
            .serf_keys()
            .into_iter()
            .map(|key| (key, self.script.clone()))
    }
}

/// Runs the handlers for every event, with Serf's coalescing (1 s quiet, 3 s at most; user
/// events fired with `--coalesce=false` pass at once). When the agent stops (it left), the
/// events still held run at once, its own leave among them, as a leaving Serf agent's
/// handlers hear it; then this returns.
pub async fn run(agent: Agent, handlers: Vec<Handler>) {
    let handlers = Arc::new(handlers);
    let mut events = agent.subscribe();
    let mut coalescer = Coalescer::serf();
    // Serf's handlers hear the local node join too (a lone agent's first event), coalesced
    // with the members it meets on its way in.
    let Some(mut me) = myself(&agent).await else {
        return;
    };
    coalescer.push(Event::MemberJoin(me.clone()), Instant::now());
    let mut stopped = false;
    while !stopped {
        let deadline = coalescer.deadline();
        let batches = tokio::select! {
            received = events.recv() => match received {
                Ok(Event::Query(query)) => {
                    tokio::spawn(answer(agent.clone(), handlers.clone(), query));
                    continue;
                }
                Ok(event) => coalescer.push(event, Instant::now()).into_iter().collect(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event handlers fell behind; events skipped");
                    continue;
                }
                Err(_) => return,
            },
            _ = sleep_until(deadline) => coalescer.flush(Instant::now()),
            _ = agent.stopped() => {
                stopped = true;
                while let Ok(event) = events.try_recv() {
                    if !matches!(event, Event::Query(_)) {
                        coalescer.push(event, Instant::now());
                    }
                }
                coalescer.flush_all(Instant::now())
            }
        };
        if batches.is_empty() {
            continue;
        }
        if !stopped && let Some(now) = myself(&agent).await {
            me = now;
        }
        for batch in batches {
            run_batch(&handlers, &batch, &me).await;
        }
    }
}

/// Runs every handler whose filter takes `batch`, one after the other, as Serf does.
async fn run_batch(handlers: &[Handler], batch: &Batch, me: &Member) {
    let (kind, name) = match batch {
        Batch::User(user) => ("user", Some(user.name.as_str())),
        Batch::Members(kind, _) => (*kind, None),
    };
    let (env, stdin) = batch_input(batch, me);
    for handler in handlers.iter().filter(|h| h.filter.allows(kind, name)) {
        if let Err(error) = invoke(kind, &handler.script, &env, &stdin).await {
            tracing::error!(target: "agent", "Error invoking script '{}': {error:#}", handler.script);
        }
    }
}

/// Runs the query's handlers; the first one that prints something answers it.
async fn answer(agent: Agent, handlers: Arc<Vec<Handler>>, query: QueryEvent) {
    let Some(me) = myself(&agent).await else {
        return;
    };
    let mut env = serf_env("query", &me);
    env.push(("SERF_QUERY_NAME".into(), query.name.clone()));
    env.push(("SERF_QUERY_LTIME".into(), query.ltime.to_string()));
    let mut answered = false;
    for handler in handlers
        .iter()
        .filter(|h| h.filter.allows("query", Some(&query.name)))
    {
        let payload = with_newline(&query.payload);
        match invoke("query", &handler.script, &env, &payload).await {
            Ok(output) if !output.is_empty() && !answered => {
                answered = true;
                if let Err(error) = agent.respond(query.id, output).await {
                    tracing::warn!(target: "agent", "Failed to respond to query '{}': {error}", query.name);
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(target: "agent", "Error invoking script '{}': {error:#}", handler.script);
            }
        }
    }
}

async fn myself(agent: &Agent) -> Option<Member> {
    let members = agent.members().await.ok()?;
    members.into_iter().find(|m| m.name == agent.name())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Serf's environment common to every event.
fn serf_env(kind: &str, me: &Member) -> Vec<(String, String)> {
    let mut env = vec![
        ("SERF_EVENT".to_string(), kind.to_string()),
        ("SERF_SELF_NAME".to_string(), me.name.clone()),
        (
            "SERF_SELF_ROLE".to_string(),
            me.tags.get("role").cloned().unwrap_or_default(),
        ),
    ];
    for (key, value) in &me.tags {
        env.push((format!("SERF_TAG_{}", env_name(key)), value.clone()));
    }
    env
}

/// A tag name as Serf puts it in a variable name: upper case, and every character outside
/// `[A-Z0-9_]` replaced by `_` (`build-id` gives `SERF_TAG_BUILD_ID`, which `/bin/sh` keeps).
fn env_name(tag: &str) -> String {
    tag.to_uppercase()
        .chars()
        .map(|c| match c {
            'A'..='Z' | '0'..='9' | '_' => c,
            _ => '_',
        })
        .collect()
}

/// A payload as Serf hands it to a handler: with a newline at the end when it has none, so
/// that `read line` sees a one-line payload.
fn with_newline(payload: &[u8]) -> Vec<u8> {
    let mut stdin = payload.to_vec();
    if stdin.last().is_some_and(|&last| last != b'\n') {
        stdin.push(b'\n');
    }
    stdin
}

/// The environment and stdin of a batch: the payload of a user event, Serf's member lines
/// (name, address, role, tags) for member events.
fn batch_input(batch: &Batch, me: &Member) -> (Vec<(String, String)>, Vec<u8>) {
    match batch {
        Batch::User(user) => {
            let mut env = serf_env("user", me);
            env.push(("SERF_USER_EVENT".into(), user.name.clone()));
            env.push(("SERF_USER_LTIME".into(), user.ltime.to_string()));
            (env, with_newline(&user.payload))
        }
        Batch::Members(kind, members) => {
            let lines: String = members.iter().map(member_line).collect();
            (serf_env(kind, me), lines.into_bytes())
        }
    }
}

fn member_line(member: &Member) -> String {
    let tags: Vec<String> = member
        .tags
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let role = member.tags.get("role").cloned().unwrap_or_default();
    format!(
        "{}\t{}\t{}\t{}\n",
        member.name,
        member.addr.ip(),
        role,
        tags.join(",")
    )
}

/// Runs one script with `env` (and its `PHOENIX_*` aliases) and `stdin`; returns what it
/// printed on stdout and stderr, in the order it came, as Serf keeps it: the last
/// [`MAX_OUTPUT`] bytes.
async fn invoke(
    kind: &str,
    script: &str,
    env: &[(String, String)],
    stdin: &[u8],
) -> Result<Vec<u8>> {
    let aliases: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.replacen("SERF_", "PHOENIX_", 1), v.clone()))
        .collect();
    // One pipe for stdout and stderr, as `2>&1` does: the output keeps the order written.
    let (reader, writer) = std::io::pipe().context("a pipe for the script's output")?;
    let mut child = {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .envs(env.iter().cloned().chain(aliases))
            .stdin(Stdio::piped())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .kill_on_drop(true);
        // The command (and its copies of the pipe's write end) goes when this block ends, so
        // the reader sees the end of the output when the script's last process exits.
        command.spawn().with_context(|| format!("start {script}"))?
    };
    let mut input = child.stdin.take();
    let stdin = stdin.to_vec();
    let feed = async move {
        if let Some(input) = input.as_mut() {
            // A handler that does not read its stdin is fine.
            let _ = input.write_all(&stdin).await;
        }
        drop(input);
    };
    let read = tokio::task::spawn_blocking(move || read_output(reader));
    // Serf's warning for a handler that runs long (it holds up the handlers after it).
    let slow = {
        let script = script.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(SLOW).await;
            tracing::warn!(target: "agent", "Script '{script}' slow, execution exceeding {SLOW:?}");
        })
    };
    let ((), output) = tokio::join!(feed, read);
    let (output, written) = output.context("the script's output")?;
    let status = child.wait().await;
    slow.abort();
    let status = status?;
    if written > output.len() {
        tracing::warn!(
            target: "agent",
            "Script '{script}' generated {written} bytes of output, truncated to {}",
            output.len()
        );
    }
    tracing::debug!(
        target: "agent",
        "Event '{kind}' script output: {}",
        String::from_utf8_lossy(&output)
    );
    if !status.success() {
        // Go's words for it, as Serf's log shows them.
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => bail!("exit status {code}"),
            (None, Some(signal)) => bail!("signal: {signal}"),
            (None, None) => bail!("{status}"),
        }
    }
    Ok(output)
}

/// How long a handler runs before Serf's "slow" warning.
const SLOW: Duration = Duration::from_secs(1);

/// A script's output to its end; only the last [`MAX_OUTPUT`] bytes are kept. Also returns
/// how many bytes it wrote in all.
fn read_output(mut reader: std::io::PipeReader) -> (Vec<u8>, usize) {
    use std::io::Read;
    let mut written = 0;
    let mut output = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = reader.read(&mut chunk) {
        if n == 0 {
            break;
        }
        written += n;
        output.extend_from_slice(&chunk[..n]);
        let over = output.len().saturating_sub(MAX_OUTPUT);
        output.drain(..over);
    }
    (output, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lines_follow_serf() {
        let member = Member {
            name: "web-1".into(),
            addr: "127.0.0.1:7946".parse().unwrap(),
            tags: std::collections::BTreeMap::from([
                ("role".to_string(), "web".to_string()),
                ("dc".to_string(), "east".to_string()),
            ]),
            status: phoenix_gossip::Status::Alive,
        };
        assert_eq!(
            member_line(&member),
            "web-1\t127.0.0.1\tweb\tdc=east,role=web\n"
        );
        let env = serf_env("member-join", &member);
        assert!(env.contains(&("SERF_SELF_ROLE".into(), "web".into())));
        assert!(env.contains(&("SERF_TAG_DC".into(), "east".into())));
    }

    /// Waits up to 10 s for `path` to hold `count` lines.
    async fn lines(path: &std::path::Path, count: usize) -> Vec<String> {
        for _ in 0..100 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= count {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{} never held {count} lines", path.display());
    }

    #[tokio::test]
    async fn a_lone_agent_hears_itself_join_and_its_own_tag_change() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let mut config = phoenix_gossip::AgentConfig::new("solo", "127.0.0.1:0".parse().unwrap());
        config.tags.insert("build-id".into(), "41".into());
        config.tags.insert("role".into(), "one".into());
        let agent = Agent::start(config).await.unwrap();
        let script = format!(
            r#"while read -r name addr role tags; do echo "$SERF_EVENT $name $tags $SERF_TAG_BUILD_ID"; done >> {}"#,
            seen.display()
        );
        let handlers = vec![Handler::parse(&script).unwrap()];
        let running = tokio::spawn(run(agent.clone(), handlers));
        assert_eq!(
            lines(&seen, 1).await,
            ["member-join solo build-id=41,role=one 41"],
            "the local node's own join"
        );
        let tags = std::collections::BTreeMap::from([
            ("build-id".into(), "42".into()),
            ("role".into(), "one".into()),
        ]);
        agent.set_tags(tags).await.unwrap();
        assert_eq!(
            lines(&seen, 2).await[1],
            "member-update solo build-id=42,role=one 42",
            "its own tag change"
        );
        running.abort();
        let _ = agent.leave().await;
    }

    #[test]
    fn tag_names_become_variable_names_as_serf_makes_them() {
        assert_eq!(env_name("build-id"), "BUILD_ID");
        assert_eq!(env_name("a.b c/d"), "A_B_C_D");
        assert_eq!(env_name("zone_2"), "ZONE_2");
    }

    #[test]
    fn handlers_parse_as_serf_parses_them() {
        let every = Handler::parse("./h.sh").unwrap();
        assert!(every.filter.allows("member-reap", None));
        let some = Handler::parse("member-join,user:deploy=./h.sh --x=1").unwrap();
        assert_eq!(some.script, "./h.sh --x=1");
        assert!(some.filter.allows("user", Some("deploy")));
        assert!(!some.filter.allows("user", Some("other")));
        for bad in ["bogus-event=x", "FOO=1 ./h.sh", "member-join="] {
            let error = Handler::parse(bad).err().expect(bad).to_string();
            assert!(error.contains("Invalid event script"), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn a_handler_gets_a_one_line_payload_with_a_newline_and_answers_with_stderr_too() {
        let script = r#"read line; echo "got $line"; echo "warned" >&2"#;
        let output = invoke("user", script, &[], &with_newline(b"hello"))
            .await
            .unwrap();
        assert_eq!(String::from_utf8(output).unwrap(), "got hello\nwarned\n");
        assert_eq!(with_newline(b"two\n"), b"two\n");
        assert_eq!(with_newline(b""), b"");
        // Only the last 8 KiB are kept, as Serf's circular buffer keeps them.
        let long = "i=0; while [ $i -lt 3000 ]; do printf 'line %05d\\n' $i; i=$((i+1)); done";
        let output = invoke("user", long, &[], b"").await.unwrap();
        assert_eq!(output.len(), MAX_OUTPUT);
        assert!(output.ends_with(b"line 02999\n"));
    }
}
