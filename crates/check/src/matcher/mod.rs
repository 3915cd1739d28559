//! goss's matchers: plain values, patterns, and the advanced (gomega) matchers written as a map
//! with one key (`have-prefix: "x"`, `not: {...}`, `and: [...]`).

mod gjson;
mod semver;
mod xml;

use regex::Regex;
use serde_json::Value as Json;

use crate::yaml::{Node, Value};

/// A position and what is wrong there; the suite adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Invalid {
    pub fn at(node: &Node, message: impl Into<String>) -> Invalid {
        Invalid {
            line: node.line,
            column: node.column,
            message: message.into(),
        }
    }
}

/// The names of the advanced matchers, for errors.
pub const MATCHERS: &[&str] = &[
    "equal",
    "have-prefix",
    "have-suffix",
    "contain-substring",
    "match-regexp",
    "contain-element",
    "contain-elements",
    "consist-of",
    "have-len",
    "have-key",
    "gt",
    "ge",
    "lt",
    "le",
    "and",
    "or",
    "not",
    "semver-constraint",
    "gjson",
    "xml",
];

#[derive(Debug, Clone)]
pub enum Matcher {
    Equal(Json),
    /// goss patterns on text: every one must hold for some line (`!` negates, `/re/` is a regex).
    Patterns(Vec<Pattern>),
    HavePrefix(String),
    HaveSuffix(String),
    ContainSubstring(String),
    MatchRegexp(Regex),
    ContainElement(Box<Matcher>),
    /// Each matcher matches some element (what a plain list means for list attributes).
    ContainElements(Vec<Matcher>),
    /// The elements match the matchers one to one, in any order.
    ConsistOf(Vec<Matcher>),
    HaveLen(usize),
    HaveKey(Box<Matcher>),
    Compare(Comparison, f64),
    And(Vec<Matcher>),
    Or(Vec<Matcher>),
    Not(Box<Matcher>),
    /// Every version satisfies the range (blang/semver's syntax).
    Semver(semver::Range),
    /// Each path's value in JSON text satisfies its matcher.
    Gjson(Vec<(String, Matcher)>),
    Xml(xml::XmlQuery),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone)]
pub struct Pattern {
    pub text: String,
    pub negated: bool,
    /// A `/regex/` (with `i`, `m`, `s` flags after it): the compiled expression, or why it
    /// does not compile. As in goss, a bad one fails its attribute, not the whole file.
    regex: Option<Result<Regex, String>>,
}

/// How a plain (non-matcher) expectation is read for an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A scalar compared for equality (a plain list: contains all of these).
    Scalar,
    /// A list attribute: a plain list means "contains all of these".
    List,
    /// Text checked with goss patterns when given a list.
    Text,
}

impl Matcher {
    /// Parses an expectation for an attribute of `shape`.
    pub fn parse(node: &Node, shape: Shape) -> Result<Matcher, Invalid> {
        if let Some(matcher) = Matcher::advanced(node)? {
            return Ok(matcher);
        }
        match (&node.value, shape) {
            (Value::Seq(items), Shape::Text) => items
                .iter()
                .map(Pattern::parse)
                .collect::<Result<_, _>>()
                .map(Matcher::Patterns),
            // goss reads any plain list as "contains all of these": on a list attribute, and on
            // a value such as `matching`'s content (a subset, not an exact list).
            (Value::Seq(items), Shape::List | Shape::Scalar) => items
                .iter()
                .map(Matcher::element)
                .collect::<Result<_, _>>()
                .map(Matcher::ContainElements),
            (Value::Map(_), _) => unreachable!("maps are advanced matchers"),
            _ => Ok(Matcher::Equal(node.to_json())),
        }
    }

    /// A matcher inside a list or a matcher: a nested matcher, or a value to equal.
    fn element(node: &Node) -> Result<Matcher, Invalid> {
        Ok(Matcher::advanced(node)?.unwrap_or_else(|| Matcher::Equal(node.to_json())))
    }

    fn advanced(node: &Node) -> Result<Option<Matcher>, Invalid> {
        let Value::Map(entries) = &node.value else {
            return Ok(None);
        };
        let [(key, arg)] = entries.as_slice() else {
            return Err(Invalid::at(
                node,
                format!(
                    "a matcher is a map with exactly one key, one of: {}",
                    MATCHERS.join(", ")
                ),
            ));
        };
        let name = key.as_text().unwrap_or_default();
        let text = || {
            arg.as_text().ok_or_else(|| {
                Invalid::at(arg, format!("{name} takes a string, not {}", arg.kind()))
            })
        };
        let list = || match &arg.value {
            Value::Seq(items) => items
                .iter()
                .map(Matcher::element)
                .collect::<Result<Vec<_>, _>>(),
            _ => Err(Invalid::at(
                arg,
                format!("{name} takes a list, not {}", arg.kind()),
            )),
        };
        let number = || match arg.value {
            Value::Int(i) => Ok(i as f64),
            Value::Float(f) => Ok(f),
            _ => Err(Invalid::at(
                arg,
                format!("{name} takes a number, not {}", arg.kind()),
            )),
        };
        let matcher = match name.as_str() {
            "equal" => Matcher::Equal(arg.to_json()),
            "have-prefix" => Matcher::HavePrefix(text()?),
            "have-suffix" => Matcher::HaveSuffix(text()?),
            "contain-substring" => Matcher::ContainSubstring(text()?),
            "match-regexp" => Matcher::MatchRegexp(regex(arg, &text()?)?),
            "contain-element" => Matcher::ContainElement(Box::new(Matcher::element(arg)?)),
            "contain-elements" => Matcher::ContainElements(list()?),
            "consist-of" => Matcher::ConsistOf(list()?),
            "have-key" => Matcher::HaveKey(Box::new(Matcher::element(arg)?)),
            "have-len" => match arg.value {
                Value::Int(n) if n >= 0 => Matcher::HaveLen(n as usize),
                _ => return Err(Invalid::at(arg, "have-len takes a non-negative integer")),
            },
            "gt" => Matcher::Compare(Comparison::Gt, number()?),
            "ge" => Matcher::Compare(Comparison::Ge, number()?),
            "lt" => Matcher::Compare(Comparison::Lt, number()?),
            "le" => Matcher::Compare(Comparison::Le, number()?),
            "and" => Matcher::And(list()?),
            "or" => Matcher::Or(list()?),
            "not" => Matcher::Not(Box::new(Matcher::element(arg)?)),
            "semver-constraint" => {
                Matcher::Semver(semver::Range::parse(&text()?).map_err(|e| Invalid::at(arg, e))?)
            }
            "gjson" => Matcher::Gjson(gjson_paths(arg)?),
            "xml" => Matcher::Xml(xml_query(arg)?),
            other => {
                return Err(Invalid::at(
                    key,
                    format!("unknown matcher {other:?}; known: {}", MATCHERS.join(", ")),
                ));
            }
        };
        Ok(Some(matcher))
    }

    /// Whether `actual` satisfies the matcher; an error when the matcher cannot apply to it.
    /// What goss says was expected when this matcher fails (`Expected X to equal Y`).
    pub fn message(&self) -> String {
        let text = match self {
            Matcher::Equal(_) => "to equal",
            Matcher::Patterns(_) => "to have patterns",
            Matcher::HavePrefix(_) => "to have prefix",
            Matcher::HaveSuffix(_) => "to have suffix",
            Matcher::ContainSubstring(_) => "to contain substring",
            Matcher::MatchRegexp(_) => "to match regular expression",
            Matcher::ContainElement(_) => "to contain element matching",
            Matcher::ContainElements(_) => "to contain elements matching",
            Matcher::ConsistOf(_) => "to consist of",
            Matcher::HaveLen(_) => "to have length",
            Matcher::HaveKey(_) => "to have key matching",
            Matcher::Compare(comparison, _) => {
                let sign = match comparison {
                    Comparison::Gt => ">",
                    Comparison::Ge => ">=",
                    Comparison::Lt => "<",
                    Comparison::Le => "<=",
                };
                return format!("to be numerically {sign}");
            }
            Matcher::And(_) => "to satisfy all of these matchers",
            Matcher::Or(_) => "to satisfy at least one of these matchers",
            Matcher::Not(inner) => {
                return inner.message().replacen("to ", "not to ", 1);
            }
            Matcher::Semver(_) => "to satisfy semver constraint",
            Matcher::Gjson(_) => "to satisfy all of these matchers",
            Matcher::Xml(_) => "satisfied XPath match with intended result",
        };
        text.to_string()
    }

    pub fn matches(&self, actual: &Json) -> Result<bool, String> {
        Ok(match self {
            Matcher::Equal(expected) => equal(expected, actual),
            Matcher::Patterns(patterns) => {
                let text = as_text(actual)?;
                let mut all = true;
                for pattern in patterns {
                    all &= pattern.holds(&text)?;
                }
                all
            }
            Matcher::HavePrefix(prefix) => as_text(actual)?.starts_with(prefix.as_str()),
            Matcher::HaveSuffix(suffix) => as_text(actual)?.ends_with(suffix.as_str()),
            Matcher::ContainSubstring(part) => as_text(actual)?.contains(part.as_str()),
            Matcher::MatchRegexp(regex) => regex.is_match(&as_text(actual)?),
            Matcher::ContainElement(element) => any_element(element, as_list(actual)?)?,
            Matcher::ContainElements(elements) => {
                let list = as_list(actual)?;
                let mut all = true;
                for element in elements {
                    all &= any_element(element, list)?;
                }
                all
            }
            Matcher::ConsistOf(elements) => consist_of(elements, as_list(actual)?)?,
            Matcher::HaveLen(len) => match actual {
                Json::String(s) => s.chars().count() == *len,
                Json::Array(items) => items.len() == *len,
                Json::Object(map) => map.len() == *len,
                _ => return Err(format!("have-len cannot measure {actual}")),
            },
            Matcher::HaveKey(key) => match actual {
                Json::Object(map) => {
                    let mut found = false;
                    for name in map.keys() {
                        found |= key.matches(&Json::String(name.clone()))?;
                    }
                    found
                }
                _ => return Err(format!("have-key needs a map, not {actual}")),
            },
            Matcher::Compare(op, bound) => {
                let value = as_number(actual)?;
                match op {
                    Comparison::Gt => value > *bound,
                    Comparison::Ge => value >= *bound,
                    Comparison::Lt => value < *bound,
                    Comparison::Le => value <= *bound,
                }
            }
            Matcher::And(all) => {
                for matcher in all {
                    if !matcher.matches(actual)? {
                        return Ok(false);
                    }
                }
                true
            }
            Matcher::Or(any) => {
                for matcher in any {
                    if matcher.matches(actual)? {
                        return Ok(true);
                    }
                }
                false
            }
            Matcher::Not(inner) => !inner.matches(actual)?,
            Matcher::Semver(range) => {
                let versions = match actual {
                    Json::Array(items) => items.iter().map(as_text).collect::<Result<_, _>>()?,
                    one => vec![as_text(one)?],
                };
                let mut all = true;
                for version in versions {
                    let version = ::semver::Version::parse(version.trim())
                        .map_err(|e| format!("{version:?} is not a semantic version: {e}"))?;
                    all &= range.holds(&version);
                }
                all
            }
            Matcher::Gjson(paths) => {
                let document: Json = serde_json::from_str(&as_text(actual)?)
                    .map_err(|e| format!("not JSON: {e}"))?;
                for (path, matcher) in paths {
                    let value = gjson::get(&document, path)
                        .ok_or_else(|| format!("Path not found: {path}"))?;
                    if !matcher.matches(&value)? {
                        return Ok(false);
                    }
                }
                true
            }
            Matcher::Xml(query) => query.matches(&as_text(actual)?)?,
        })
    }
}

/// `gjson: {PATH: MATCHER, ...}`.
fn gjson_paths(arg: &Node) -> Result<Vec<(String, Matcher)>, Invalid> {
    let Value::Map(entries) = &arg.value else {
        return Err(Invalid::at(
            arg,
            format!("gjson takes a map of paths to matchers, not {}", arg.kind()),
        ));
    };
    entries
        .iter()
        .map(|(path, matcher)| {
            Ok((
                path.as_text().unwrap_or_default(),
                Matcher::element(matcher)?,
            ))
        })
        .collect()
}

/// `xml: {xpath: EXPRESSION, result: TEXT}`.
fn xml_query(arg: &Node) -> Result<xml::XmlQuery, Invalid> {
    let Value::Map(entries) = &arg.value else {
        return Err(Invalid::at(
            arg,
            format!("xml takes a map with xpath and result, not {}", arg.kind()),
        ));
    };
    let field = |name: &str| {
        entries
            .iter()
            .find(|(key, _)| key.as_text().as_deref() == Some(name))
            .map(|(_, value)| value.as_text().unwrap_or_default())
            .ok_or_else(|| Invalid::at(arg, "xml takes a map with xpath and result"))
    };
    xml::XmlQuery::new(field("xpath")?, field("result")?).map_err(|e| Invalid::at(arg, e))
}

impl Pattern {
    fn parse(node: &Node) -> Result<Pattern, Invalid> {
        let raw = node.as_text().ok_or_else(|| {
            Invalid::at(node, format!("a pattern is a string, not {}", node.kind()))
        })?;
        let (negated, body) = match raw.strip_prefix('!') {
            Some(body) => (true, body.to_string()),
            None => (
                false,
                raw.strip_prefix('\\').map_or(raw.clone(), str::to_string),
            ),
        };
        let regex = regex_pattern(&body).map(|expr| {
            Regex::new(&expr).map_err(|e| format!("bad regular expression {expr:?}: {e}"))
        });
        Ok(Pattern {
            text: raw,
            negated,
            regex,
        })
    }

    fn holds(&self, text: &str) -> Result<bool, String> {
        let found = match &self.regex {
            Some(Ok(regex)) => text.lines().any(|line| regex.is_match(line)),
            Some(Err(error)) => return Err(error.clone()),
            None => {
                let needle = self.text.trim_start_matches(['!', '\\']);
                text.lines().any(|line| line.contains(needle))
            }
        };
        Ok(found != self.negated)
    }
}

/// goss's `/regex/` and `/regex/FLAGS` (flags `i`, `m`, `s`): the expression to compile, with
/// its flags as Go's inline `(?flags)`; `None` when the pattern is plain text.
fn regex_pattern(body: &str) -> Option<String> {
    let inner = body.strip_prefix('/')?;
    let closing = inner.rfind('/')?;
    let flags = &inner[closing + 1..];
    if !flags.chars().all(|c| matches!(c, 'i' | 'm' | 's')) {
        return None;
    }
    let expr = &inner[..closing];
    Some(match flags.is_empty() {
        true => expr.to_string(),
        false => format!("(?{flags}){expr}"),
    })
}

fn regex(node: &Node, expr: &str) -> Result<Regex, Invalid> {
    Regex::new(expr).map_err(|e| Invalid::at(node, format!("bad regular expression {expr:?}: {e}")))
}

/// Equality as goss sees it: numbers compare by value even when one side is text (`"0644"` and
/// `644`, a kernel parameter `"1"` and `1`).
fn equal(expected: &Json, actual: &Json) -> bool {
    if expected == actual {
        return true;
    }
    match (expected, actual) {
        (Json::Number(_), Json::String(_)) | (Json::String(_), Json::Number(_)) => {
            matches!((as_number(expected), as_number(actual)), (Ok(a), Ok(b)) if a == b)
        }
        (Json::String(e), Json::String(a)) => e.trim_end() == a.trim_end(),
        _ => false,
    }
}

fn any_element(element: &Matcher, list: &[Json]) -> Result<bool, String> {
    for item in list {
        if element.matches(item)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A perfect matching of elements to matchers (augmenting paths; lists are short).
fn consist_of(matchers: &[Matcher], list: &[Json]) -> Result<bool, String> {
    if matchers.len() != list.len() {
        return Ok(false);
    }
    let mut fits = vec![vec![false; list.len()]; matchers.len()];
    for (m, matcher) in matchers.iter().enumerate() {
        for (i, item) in list.iter().enumerate() {
            fits[m][i] = matcher.matches(item)?;
        }
    }
    let mut owner: Vec<Option<usize>> = vec![None; list.len()];
    for m in 0..matchers.len() {
        let mut seen = vec![false; list.len()];
        if !augment(m, &fits, &mut owner, &mut seen) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn augment(m: usize, fits: &[Vec<bool>], owner: &mut [Option<usize>], seen: &mut [bool]) -> bool {
    for i in 0..owner.len() {
        if fits[m][i] && !seen[i] {
            seen[i] = true;
            if owner[i].is_none_or(|other| augment(other, fits, owner, seen)) {
                owner[i] = Some(m);
                return true;
            }
        }
    }
    false
}

fn as_text(actual: &Json) -> Result<String, String> {
    match actual {
        Json::String(s) => Ok(s.clone()),
        Json::Number(n) => Ok(n.to_string()),
        Json::Bool(b) => Ok(b.to_string()),
        _ => Err(format!("expected text, found {actual}")),
    }
}

fn as_list(actual: &Json) -> Result<&[Json], String> {
    match actual {
        Json::Array(items) => Ok(items),
        _ => Err(format!("expected a list, found {actual}")),
    }
}

fn as_number(actual: &Json) -> Result<f64, String> {
    match actual {
        Json::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Json::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number")),
        _ => Err(format!("expected a number, found {actual}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;
    use serde_json::json;

    fn matcher(yaml: &str, shape: Shape) -> Matcher {
        let doc = parse(&format!("m: {yaml}")).unwrap();
        let Value::Map(entries) = doc.value else {
            panic!()
        };
        Matcher::parse(&entries[0].1, shape).unwrap()
    }

    fn check(yaml: &str, shape: Shape, actual: Json) -> bool {
        matcher(yaml, shape).matches(&actual).unwrap()
    }

    /// goss's `/regex/FLAGS` patterns; a bad expression fails its attribute when it runs, as
    /// in goss, instead of refusing the file.
    #[test]
    fn regex_patterns_take_flags_and_bad_ones_fail_when_run() {
        let text = json!("Hello World\nsecond line");
        assert!(check("[\"/^hello/i\"]", Shape::Text, text.clone()));
        assert!(!check("[\"/^hello/\"]", Shape::Text, text.clone()));
        assert!(check(
            "[\"!/^bye/\", \"/Wor.d/\"]",
            Shape::Text,
            text.clone()
        ));
        assert!(
            check("[\"/a/b\"]", Shape::Text, json!("x /a/b y")),
            "b is no flag: plain text"
        );
        let bad = matcher("[\"!//\\\\(v|r)/\"]", Shape::Text).matches(&text);
        assert!(bad.unwrap_err().contains("bad regular expression"));
    }

    #[test]
    fn plain_values_and_string_matchers() {
        assert!(check("true", Shape::Scalar, json!(true)));
        assert!(!check("true", Shape::Scalar, json!(false)));
        assert!(check("\"0644\"", Shape::Scalar, json!("0644")));
        assert!(check("644", Shape::Scalar, json!("0644")));
        assert!(check("{have-prefix: ab}", Shape::Scalar, json!("abc")));
        assert!(!check("{have-prefix: bc}", Shape::Scalar, json!("abc")));
        assert!(check("{have-suffix: bc}", Shape::Scalar, json!("abc")));
        assert!(!check("{have-suffix: ab}", Shape::Scalar, json!("abc")));
        assert!(check("{contain-substring: b}", Shape::Scalar, json!("abc")));
        assert!(!check(
            "{contain-substring: x}",
            Shape::Scalar,
            json!("abc")
        ));
        assert!(check(
            "{match-regexp: '^a.c$'}",
            Shape::Scalar,
            json!("abc")
        ));
        assert!(!check("{match-regexp: '^b'}", Shape::Scalar, json!("abc")));
        assert!(check("{equal: 3}", Shape::Scalar, json!(3)));
    }

    #[test]
    fn list_matchers() {
        let groups = json!(["adm", "sudo", "www"]);
        assert!(check("[sudo, adm]", Shape::List, groups.clone()));
        assert!(!check("[sudo, wheel]", Shape::List, groups.clone()));
        assert!(check("{contain-element: www}", Shape::List, groups.clone()));
        assert!(!check("{contain-element: x}", Shape::List, groups.clone()));
        assert!(check(
            "{contain-element: {have-prefix: su}}",
            Shape::List,
            groups.clone()
        ));
        assert!(check(
            "{contain-elements: [www, adm]}",
            Shape::List,
            groups.clone()
        ));
        assert!(check(
            "{consist-of: [www, adm, sudo]}",
            Shape::List,
            groups.clone()
        ));
        assert!(!check(
            "{consist-of: [www, adm]}",
            Shape::List,
            groups.clone()
        ));
        assert!(!check(
            "{consist-of: [www, adm, adm]}",
            Shape::List,
            groups.clone()
        ));
        assert!(check(
            "{consist-of: [{have-prefix: s}, {have-len: 3}, www]}",
            Shape::List,
            groups.clone()
        ));
        assert!(check("{have-len: 3}", Shape::List, groups.clone()));
        // A plain list on a value is a subset, as goss's `matching` reads it.
        assert!(check("[www, adm]", Shape::Scalar, groups.clone()));
        assert!(!check("[www, wheel]", Shape::Scalar, groups.clone()));
        assert!(!check("{have-len: 2}", Shape::List, groups));
        assert!(check("{have-key: a}", Shape::Scalar, json!({"a": 1})));
    }

    #[test]
    fn numbers_and_logic() {
        assert!(check("{gt: 1}", Shape::Scalar, json!(2)));
        assert!(!check("{gt: 2}", Shape::Scalar, json!(2)));
        assert!(check("{ge: 2}", Shape::Scalar, json!("2")));
        assert!(check("{lt: 2.5}", Shape::Scalar, json!(2)));
        assert!(!check("{le: 1}", Shape::Scalar, json!(2)));
        assert!(check("{and: [{gt: 1}, {lt: 3}]}", Shape::Scalar, json!(2)));
        assert!(!check("{and: [{gt: 1}, {lt: 2}]}", Shape::Scalar, json!(2)));
        assert!(check("{or: [{gt: 5}, 2]}", Shape::Scalar, json!(2)));
        assert!(!check("{or: [{gt: 5}, 3]}", Shape::Scalar, json!(2)));
        assert!(check(
            "{not: {contain-element: x}}",
            Shape::List,
            json!(["a"])
        ));
        assert!(!check("{not: 2}", Shape::Scalar, json!(2)));
        assert!(
            matcher("{gt: 1}", Shape::Scalar)
                .matches(&json!("abc"))
                .is_err()
        );
    }

    #[test]
    fn patterns_hold_per_line() {
        let text = json!("found\n!alsofound\nport = 8080\n");
        assert!(check(
            "[found, /fou.d/, '\\!alsofound', '!missing', '!/mis.ing/', '/port = \\d+/']",
            Shape::Text,
            text.clone()
        ));
        assert!(!check("[missing]", Shape::Text, text.clone()));
        assert!(!check("['!found']", Shape::Text, text.clone()));
        assert!(!check("['/^port = 9/']", Shape::Text, text));
    }

    #[test]
    fn bad_matchers_name_their_position() {
        let doc = parse("m:\n  not-a-matcher: 1\n").unwrap();
        let Value::Map(entries) = doc.value else {
            panic!()
        };
        let error = Matcher::parse(&entries[0].1, Shape::Scalar).unwrap_err();
        assert_eq!((error.line, error.column), (2, 3));
        assert!(
            error.message.contains("unknown matcher \"not-a-matcher\""),
            "{error:?}"
        );
        let doc = parse("m: {match-regexp: '('}\n").unwrap();
        let Value::Map(entries) = doc.value else {
            panic!()
        };
        assert!(
            Matcher::parse(&entries[0].1, Shape::Scalar)
                .unwrap_err()
                .message
                .contains("bad regular expression")
        );
    }
}
