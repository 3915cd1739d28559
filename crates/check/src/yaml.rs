//! A YAML (and so JSON) document as a tree whose every node knows its line and column, so that
//! an unknown key or a bad value can be reported where it is written.

use saphyr_parser::{Event, Parser, ScalarStyle};
use serde_json::Value as Json;

/// One node of a document and where it starts (1-based line and column).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in the order written; keys are unique (duplicates are an error).
    Map(Vec<(Node, Node)>),
}

/// A syntax error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Node {
    /// The scalar as text (`true`, `12`, `abc`); `None` for null, sequences and maps.
    pub fn as_text(&self) -> Option<String> {
        match &self.value {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }

    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }

    /// The plain data, without positions.
    pub fn to_json(&self) -> Json {
        match &self.value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Value::Str(s) => Json::String(s.clone()),
            Value::Seq(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => Json::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_text().unwrap_or_default(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// A collection being read: its node, its anchor, and how many nodes existed when it
/// started (to know its size when it ends).
enum Frame {
    Seq(Node, Option<usize>, usize),
    /// A map also has the key waiting for its value, the keys so far (duplicates are found in
    /// constant time, so a long map parses in linear time), and what `<<` merge keys bring.
    Map(Node, Option<usize>, usize, MapState),
}

#[derive(Default)]
struct MapState {
    pending: Option<Node>,
    keys: std::collections::HashSet<String>,
    /// Entries of the maps named by `<<`, in order; the first one of a key wins.
    merged: Vec<(Node, Node)>,
}

impl MapState {
    /// The map's entries with what `<<` brought added: keys written in the map win over
    /// merged ones, as in YAML's merge key type (and goss's yaml.v3).
    fn finish(self, node: &mut Node) {
        let Value::Map(entries) = &mut node.value else {
            return;
        };
        let mut keys = self.keys;
        for (key, value) in self.merged {
            if keys.insert(key.as_text().unwrap_or_default()) {
                entries.push((key, value));
            }
        }
    }
}

/// Most nodes a document may expand to, aliases included: a "billion laughs" document (each
/// alias repeating the one before many times) is refused at once, in bounded memory.
pub const MAX_NODES: usize = 1_000_000;

/// Parses the first document of `text`. An empty document is an empty map.
///
/// One leniency of goss's YAML library (libyaml's) is kept: the continuation lines of a quoted
/// scalar may be less indented than its block (a template that puts a multi-line value in
/// quotes writes them so). Those lines are indented and the text parsed again; a quoted
/// scalar's folding drops leading spaces, so the value is the same.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut text = std::borrow::Cow::Borrowed(text);
    for _ in 0..MAX_REINDENTS {
        match parse_strict(&text) {
            Err(error)
                if error
                    .message
                    .contains("invalid indentation in quoted scalar") =>
            {
                match reindent_quoted(&text, error.line, error.column) {
                    Some(fixed) => text = std::borrow::Cow::Owned(fixed),
                    None => return Err(error),
                }
            }
            other => return other,
        }
    }
    parse_strict(&text)
}

/// How many under-indented quoted scalars one document may have.
const MAX_REINDENTS: usize = 64;

/// `text` with the continuation lines of the quoted scalar opening at `line`:`column`
/// indented to that column; `None` when there is nothing there to fix.
fn reindent_quoted(text: &str, line: usize, column: usize) -> Option<String> {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let start = line.checked_sub(1)?;
    let opening = lines.get(start)?;
    let at = opening.char_indices().nth(column.checked_sub(1)?)?.0;
    let quote = opening[at..]
        .chars()
        .next()
        .filter(|c| *c == '"' || *c == '\'')?;
    // Where the scalar ends: the line holding its closing quote.
    let mut escaped = false;
    let mut end = None;
    'lines: for (index, text) in lines.iter().enumerate().skip(start) {
        let from = if index == start { at + 1 } else { 0 };
        let mut chars = text[from..].chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                ('"', _) if escaped => escaped = false,
                ('"', '\\') => escaped = true,
                ('\'', '\'') if chars.peek() == Some(&'\'') => {
                    chars.next();
                }
                (q, c) if c == q => {
                    end = Some(index);
                    break 'lines;
                }
                _ => {}
            }
        }
    }
    // Closed on its own line: nothing to indent.
    let end = end.filter(|end| *end > start)?;
    let pad = " ".repeat(column);
    for line in &mut lines[start + 1..=end] {
        line.insert_str(0, &pad);
    }
    Some(lines.join("\n"))
}

fn parse_strict(text: &str) -> Result<Node, SyntaxError> {
    let mut stack: Vec<Frame> = Vec::new();
    // Each anchor's node and its size in nodes.
    let mut anchors: std::collections::HashMap<usize, (Node, usize)> =
        std::collections::HashMap::new();
    // Nodes made so far, aliases counted at their full size.
    let mut made = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| SyntaxError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_string(),
        })?;
        let (line, column) = (span.start.line(), span.start.col() + 1);
        let at = |value| Node {
            value,
            line,
            column,
        };
        let too_big = || {
            error(
                line,
                column,
                &format!(
                    "the document expands to more than {MAX_NODES} nodes (aliases repeating aliases?)"
                ),
            )
        };
        let done = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag.is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                made += 1;
                remember(&mut anchors, anchor, at(value), 1)
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((node, size)) => {
                    made = made.saturating_add(*size);
                    if made > MAX_NODES {
                        return Err(too_big());
                    }
                    Some(node.clone())
                }
                None => return Err(error(line, column, "unknown alias")),
            },
            Event::SequenceStart(anchor, _) => {
                made += 1;
                stack.push(Frame::Seq(at(Value::Seq(Vec::new())), Some(anchor), made));
                None
            }
            Event::MappingStart(anchor, _) => {
                made += 1;
                let state = MapState::default();
                stack.push(Frame::Map(
                    at(Value::Map(Vec::new())),
                    Some(anchor),
                    made,
                    state,
                ));
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(node, anchor, start)) => {
                    remember(&mut anchors, anchor.unwrap_or(0), node, made - start + 1)
                }
                Some(Frame::Map(mut node, anchor, start, state)) => {
                    state.finish(&mut node);
                    remember(&mut anchors, anchor.unwrap_or(0), node, made - start + 1)
                }
                None => None,
            },
            Event::DocumentEnd | Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentStart(_) => None,
        };
        if made > MAX_NODES {
            return Err(too_big());
        }
        let Some(node) = done else { continue };
        match stack.last_mut() {
            None => return Ok(node),
            Some(frame) => attach(frame, node)?,
        }
    }
    Ok(Node {
        value: Value::Map(Vec::new()),
        line: 1,
        column: 1,
    })
}

fn remember(
    anchors: &mut std::collections::HashMap<usize, (Node, usize)>,
    anchor: usize,
    node: Node,
    size: usize,
) -> Option<Node> {
    if anchor != 0 {
        anchors.insert(anchor, (node.clone(), size));
    }
    Some(node)
}

fn attach(frame: &mut Frame, node: Node) -> Result<(), SyntaxError> {
    match frame {
        Frame::Seq(parent, ..) => {
            if let Value::Seq(items) = &mut parent.value {
                items.push(node);
            }
        }
        Frame::Map(parent, _, _, state) => match state.pending.take() {
            None => {
                if node.as_text().is_none() && node.value != Value::Null {
                    return Err(error(node.line, node.column, "a key must be a scalar"));
                }
                state.pending = Some(node);
            }
            Some(key) if key.value == Value::Str("<<".into()) => merge(state, &key, node)?,
            Some(key) => {
                let Value::Map(entries) = &mut parent.value else {
                    return Ok(());
                };
                let name = key.as_text().unwrap_or_default();
                if !state.keys.insert(name.clone()) {
                    return Err(error(
                        key.line,
                        key.column,
                        &format!("duplicate key {name:?}"),
                    ));
                }
                entries.push((key, node));
            }
        },
    }
    Ok(())
}

/// A `<<` merge key's value: a map, or a list of maps (earlier ones win).
fn merge(state: &mut MapState, key: &Node, value: Node) -> Result<(), SyntaxError> {
    let maps = match value.value {
        Value::Map(_) => vec![value],
        Value::Seq(items) => items,
        _ => vec![value],
    };
    for map in maps {
        let Value::Map(entries) = map.value else {
            return Err(error(
                key.line,
                key.column,
                "a merge key (<<) takes a map or a list of maps",
            ));
        };
        state.merged.extend(entries);
    }
    Ok(())
}

fn error(line: usize, column: usize, message: &str) -> SyntaxError {
    SyntaxError {
        line,
        column,
        message: message.into(),
    }
}

/// YAML 1.2 core schema resolution of a plain (unquoted) scalar.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = text.parse::<i64>()
    {
        return Value::Int(i);
    }
    if let Some(hex) = text.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Int(i);
    }
    if let Some(octal) = text.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(octal, 8)
    {
        return Value::Int(i);
    }
    let looks_numeric = digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && digits.bytes().any(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric && let Ok(f) = text.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(node: &'a Node, key: &str) -> &'a Node {
        match &node.value {
            Value::Map(entries) => {
                &entries
                    .iter()
                    .find(|(k, _)| k.as_text().as_deref() == Some(key))
                    .unwrap()
                    .1
            }
            _ => panic!("not a map"),
        }
    }

    #[test]
    fn nodes_know_their_line_and_column() {
        let doc =
            parse("file:\n  /etc/passwd:\n    exists: true\n    mode: \"0644\"\n    size: 12\n")
                .unwrap();
        let passwd = get(get(&doc, "file"), "/etc/passwd");
        let mode = get(passwd, "mode");
        assert_eq!((mode.line, mode.column), (4, 11));
        assert_eq!(mode.value, Value::Str("0644".into()));
        assert_eq!(get(passwd, "exists").value, Value::Bool(true));
        assert_eq!(get(passwd, "size").value, Value::Int(12));
    }

    #[test]
    fn json_parses_as_yaml() {
        let doc = parse("{\"port\": {\"tcp:22\": {\"listening\": true, \"ip\": [\"0.0.0.0\"]}}}")
            .unwrap();
        let ip = get(get(get(&doc, "port"), "tcp:22"), "ip");
        assert_eq!(ip.to_json(), serde_json::json!(["0.0.0.0"]));
    }

    #[test]
    fn plain_scalars_resolve_like_yaml_1_2() {
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("-3"), Value::Int(-3));
        assert_eq!(resolve_plain("0x1f"), Value::Int(31));
        assert_eq!(resolve_plain("1.5"), Value::Float(1.5));
        assert_eq!(resolve_plain("1.2.3"), Value::Str("1.2.3".into()));
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
    }

    #[test]
    fn anchors_duplicates_and_syntax_errors() {
        let doc = parse("a: &x {k: 1}\nb: *x\n").unwrap();
        assert_eq!(get(&doc, "b").to_json(), serde_json::json!({"k": 1}));
        let dup = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!((dup.line, dup.message.as_str()), (3, "duplicate key \"a\""));
        let bad = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(bad.line >= 1, "{bad:?}");
        assert_eq!(parse("").unwrap().value, Value::Map(Vec::new()));
    }

    #[test]
    fn merge_keys_bring_a_maps_entries_and_written_keys_win() {
        let doc = parse(
            "base: &base {mode: \"0644\", owner: root}\nother: &o {group: adm}\nf:\n  owner: app\n  <<: [*base, *o]\n",
        )
        .unwrap();
        assert_eq!(
            get(&doc, "f").to_json(),
            serde_json::json!({"owner": "app", "mode": "0644", "group": "adm"})
        );
        let bad = parse("a: &a 1\nb:\n  <<: *a\n").unwrap_err();
        assert_eq!((bad.line, bad.message.contains("merge key")), (3, true));
    }

    /// goss (libyaml) takes a quoted scalar whose continuation lines are less indented than
    /// its block, as templates write multi-line values into quotes.
    #[test]
    fn under_indented_quoted_continuations_are_read_as_libyaml_reads_them() {
        let doc = parse(
            "file:\n  motd:\n    contents:\n    -  \"Authorized uses only.\n\"\n    - '!/x/'\n",
        )
        .unwrap();
        let contents = get(get(get(&doc, "file"), "motd"), "contents");
        assert_eq!(
            contents.to_json(),
            serde_json::json!(["Authorized uses only. ", "!/x/"])
        );
        assert!(parse("a: \"never closed\nb: 1\n").is_err());
    }

    /// "Billion laughs": nine levels of ten aliases each would be a billion nodes. It is
    /// refused as soon as it passes the bound, having built at most that many.
    #[test]
    fn an_alias_bomb_is_refused_at_the_bound() {
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        {
            let aliases = vec![format!("*{prev}"); 9].join(",");
            bomb.push_str(&format!("{name}: &{name} [{aliases}]\n"));
        }
        let error = parse(&bomb).unwrap_err();
        assert!(
            error.message.contains("expands to more than 1000000 nodes"),
            "{error:?}"
        );
        // Below the bound, aliases still expand (six levels: 9^6 = 531,441 leaves).
        let six: String = bomb.lines().take(6).map(|l| format!("{l}\n")).collect();
        let doc = parse(&six).unwrap();
        assert_eq!(get(&doc, "f").to_json().as_array().unwrap().len(), 9);
    }

    /// A long map is read key by key, each checked against the others without a scan.
    #[test]
    fn a_map_of_many_keys_parses_and_still_finds_a_duplicate() {
        let mut text: String = (0..20_000).map(|i| format!("k{i}: {i}\n")).collect();
        let doc = parse(&text).unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries.len(), 20_000);
        text.push_str("k7: again\n");
        let dup = parse(&text).unwrap_err();
        assert_eq!(
            (dup.line, dup.message.as_str()),
            (20_001, "duplicate key \"k7\"")
        );
    }
}
