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

enum Frame {
    Seq(Node, Option<usize>),
    Map(Node, Option<usize>, Option<Node>),
}

/// Parses the first document of `text`. An empty document is an empty map.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: Vec<(usize, Node)> = Vec::new();
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
        let done = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag.is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                remember(&mut anchors, anchor, at(value))
            }
            Event::Alias(id) => match anchors.iter().rev().find(|(a, _)| *a == id) {
                Some((_, node)) => Some(node.clone()),
                None => return Err(error(line, column, "unknown alias")),
            },
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(at(Value::Seq(Vec::new())), Some(anchor)));
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(at(Value::Map(Vec::new())), Some(anchor), None));
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(node, anchor) | Frame::Map(node, anchor, _)) => {
                    remember(&mut anchors, anchor.unwrap_or(0), node)
                }
                None => None,
            },
            Event::DocumentEnd | Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentStart(_) => None,
        };
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

fn remember(anchors: &mut Vec<(usize, Node)>, anchor: usize, node: Node) -> Option<Node> {
    if anchor != 0 {
        anchors.push((anchor, node.clone()));
    }
    Some(node)
}

fn attach(frame: &mut Frame, node: Node) -> Result<(), SyntaxError> {
    match frame {
        Frame::Seq(parent, _) => {
            if let Value::Seq(items) = &mut parent.value {
                items.push(node);
            }
        }
        Frame::Map(parent, _, pending) => match pending.take() {
            None => {
                if node.as_text().is_none() && node.value != Value::Null {
                    return Err(error(node.line, node.column, "a key must be a scalar"));
                }
                *pending = Some(node);
            }
            Some(key) => {
                let Value::Map(entries) = &mut parent.value else {
                    return Ok(());
                };
                if entries.iter().any(|(k, _)| k.as_text() == key.as_text()) {
                    let name = key.as_text().unwrap_or_default();
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
}
