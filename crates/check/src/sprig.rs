//! Sprig's template functions that goss files reach for, beyond the few in `template.rs`, and
//! goss's `mkSlice` and `findStringSubmatch`. Each keeps Sprig's argument order (the piped
//! value last). What could grow without bound (`repeat`, `until`, `indent`) is capped so a
//! hostile file gets an error, not an exhausted machine.

use std::collections::HashMap;

use base64::Engine;
use gtmpl::{FuncError, Value};
use sha2::{Digest, Sha256};

pub type Function = fn(&[Value]) -> Result<Value, FuncError>;

/// The most text or list items these functions may make in one render, all calls together:
/// a loop calling `until` inside a loop spends the same budget.
const MAX_OUTPUT: usize = 1 << 20;

thread_local! {
    static BUDGET: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_OUTPUT) };
}

/// Gives the render about to start its whole budget.
pub fn reset_budget() {
    BUDGET.with(|budget| budget.set(MAX_OUTPUT));
}

pub const FUNCTIONS: &[(&str, Function)] = &[
    // goss's own.
    ("mkSlice", list),
    ("findStringSubmatch", find_string_submatch),
    // Strings.
    ("trimPrefix", |a| trim_with(a, |t, p| t.strip_prefix(p))),
    ("trimSuffix", |a| trim_with(a, |t, p| t.strip_suffix(p))),
    ("trimAll", |a| {
        let cut = text(a, 0)?;
        Ok(text(a, 1)?.trim_matches(|c| cut.contains(c)).into())
    }),
    ("title", title),
    ("quote", |a| {
        Ok(format!("{:?}", all_text(a)?.join(" ")).into())
    }),
    ("squote", |a| {
        Ok(format!("'{}'", all_text(a)?.join(" ")).into())
    }),
    ("cat", |a| Ok(all_text(a)?.join(" ").into())),
    ("nospace", |a| {
        Ok(text(a, 0)?.split_whitespace().collect::<String>().into())
    }),
    ("repeat", repeat),
    ("substr", substr),
    ("trunc", trunc),
    ("indent", |a| indent(a, false)),
    ("nindent", |a| indent(a, true)),
    ("split", split),
    ("splitList", |a| {
        Ok(Value::Array(
            text(a, 1)?.split(&text(a, 0)?).map(Value::from).collect(),
        ))
    }),
    ("join", |a| {
        Ok(items(a, 1)?
            .iter()
            .map(plain)
            .collect::<Vec<_>>()
            .join(&text(a, 0)?)
            .into())
    }),
    ("toString", |a| Ok(plain(arg(a, 0)?).into())),
    ("toJson", |a| {
        Ok(serde_json::to_string(&json_of(arg(a, 0)?))
            .unwrap_or_default()
            .into())
    }),
    ("b64enc", |a| {
        Ok(base64::engine::general_purpose::STANDARD
            .encode(text(a, 0)?)
            .into())
    }),
    ("b64dec", b64dec),
    ("sha256sum", |a| {
        Ok(format!("{:x}", Sha256::digest(text(a, 0)?.as_bytes())).into())
    }),
    ("regexFind", |a| {
        Ok(regex(a, 0)?
            .find(&text(a, 1)?)
            .map_or("", |m| m.as_str())
            .to_string()
            .into())
    }),
    ("regexReplaceAll", |a| {
        Ok(regex(a, 0)?
            .replace_all(&text(a, 1)?, text(a, 2)?.as_str())
            .into_owned()
            .into())
    }),
    // Lists.
    ("list", list),
    ("first", |a| {
        Ok(items(a, 0)?.first().cloned().unwrap_or(Value::Nil))
    }),
    ("last", |a| {
        Ok(items(a, 0)?.last().cloned().unwrap_or(Value::Nil))
    }),
    ("rest", |a| {
        Ok(Value::Array(items(a, 0)?.iter().skip(1).cloned().collect()))
    }),
    ("initial", |a| {
        let all = items(a, 0)?;
        Ok(Value::Array(all[..all.len().saturating_sub(1)].to_vec()))
    }),
    ("append", |a| {
        let mut all = items(a, 0)?;
        all.push(arg(a, 1)?.clone());
        Ok(Value::Array(all))
    }),
    ("prepend", |a| {
        let mut all = items(a, 0)?;
        all.insert(0, arg(a, 1)?.clone());
        Ok(Value::Array(all))
    }),
    ("concat", |a| {
        let mut all = Vec::new();
        for at in 0..a.len() {
            all.extend(items(a, at)?);
        }
        Ok(Value::Array(all))
    }),
    ("has", |a| Ok(items(a, 1)?.contains(arg(a, 0)?).into())),
    ("uniq", |a| {
        let mut seen: Vec<Value> = Vec::new();
        for item in items(a, 0)? {
            if !seen.contains(&item) {
                seen.push(item);
            }
        }
        Ok(Value::Array(seen))
    }),
    ("without", |a| {
        let drop = &a[1.min(a.len())..];
        Ok(Value::Array(
            items(a, 0)?
                .into_iter()
                .filter(|i| !drop.contains(i))
                .collect(),
        ))
    }),
    ("compact", |a| {
        Ok(Value::Array(
            items(a, 0)?.into_iter().filter(|i| !is_empty(i)).collect(),
        ))
    }),
    ("sortAlpha", |a| {
        let mut all: Vec<String> = items(a, 0)?.iter().map(plain).collect();
        all.sort();
        Ok(Value::Array(all.into_iter().map(Value::from).collect()))
    }),
    ("reverse", |a| {
        Ok(Value::Array(items(a, 0)?.into_iter().rev().collect()))
    }),
    ("until", |a| {
        let count = whole(a, 0)?.max(0) as usize;
        bounded(count)?;
        Ok(Value::Array((0..count as i64).map(Value::from).collect()))
    }),
    // Dictionaries.
    ("dict", dict),
    ("get", |a| {
        Ok(entries(a, 0)?
            .get(&text(a, 1)?)
            .cloned()
            .unwrap_or_else(|| "".into()))
    }),
    ("hasKey", |a| {
        Ok(entries(a, 0)?.contains_key(&text(a, 1)?).into())
    }),
    ("keys", |a| {
        let mut keys: Vec<String> = entries(a, 0)?.into_keys().collect();
        keys.sort();
        Ok(Value::Array(keys.into_iter().map(Value::from).collect()))
    }),
    ("values", |a| {
        Ok(Value::Array(entries(a, 0)?.into_values().collect()))
    }),
    // Flow and defaults.
    ("empty", |a| Ok(a.first().is_none_or(is_empty).into())),
    ("coalesce", |a| {
        Ok(a.iter()
            .find(|v| !is_empty(v))
            .cloned()
            .unwrap_or(Value::Nil))
    }),
    ("ternary", |a| {
        Ok(if truthy(arg(a, 2)?) {
            arg(a, 0)?
        } else {
            arg(a, 1)?
        }
        .clone())
    }),
    ("required", |a| match arg(a, 1)? {
        value if is_empty(value) => Err(FuncError::Generic(text(a, 0)?)),
        value => Ok(value.clone()),
    }),
    ("fail", |a| Err(FuncError::Generic(text(a, 0)?))),
    // Numbers.
    ("add", |a| fold(a, 0, |x, y| x.checked_add(y))),
    ("mul", |a| fold(a, 1, |x, y| x.checked_mul(y))),
    ("sub", |a| arith(a, |x, y| x.checked_sub(y))),
    ("div", |a| arith(a, |x, y| x.checked_div(y))),
    ("mod", |a| arith(a, |x, y| x.checked_rem(y))),
    ("add1", |a| Ok(Value::from(whole(a, 0)?.saturating_add(1)))),
    ("max", |a| {
        Ok(Value::from(
            (0..a.len())
                .map(|i| whole(a, i))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .max()
                .unwrap_or(0),
        ))
    }),
    ("min", |a| {
        Ok(Value::from(
            (0..a.len())
                .map(|i| whole(a, i))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .min()
                .unwrap_or(0),
        ))
    }),
    ("int", |a| Ok(Value::from(whole(a, 0)?))),
    ("int64", |a| Ok(Value::from(whole(a, 0)?))),
    ("atoi", |a| {
        Ok(Value::from(text(a, 0)?.trim().parse::<i64>().unwrap_or(0)))
    }),
    ("float64", |a| {
        Ok(Value::from(
            text(a, 0)?.trim().parse::<f64>().unwrap_or(0.0),
        ))
    }),
];

fn arg(args: &[Value], at: usize) -> Result<&Value, FuncError> {
    args.get(at)
        .ok_or_else(|| FuncError::AtLeastXArgs("the function".into(), at + 1))
}

/// The argument as text, as Go's `%v` would print a scalar.
fn text(args: &[Value], at: usize) -> Result<String, FuncError> {
    Ok(plain(arg(args, at)?))
}

fn all_text(args: &[Value]) -> Result<Vec<String>, FuncError> {
    Ok(args.iter().map(plain).collect())
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Nil | Value::NoValue => String::new(),
        other => other.to_string(),
    }
}

fn whole(args: &[Value], at: usize) -> Result<i64, FuncError> {
    match arg(args, at)? {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| FuncError::Generic("not a number".into())),
        Value::String(s) => Ok(s.trim().parse().unwrap_or(0)),
        Value::Bool(b) => Ok(i64::from(*b)),
        _ => Ok(0),
    }
}

fn items(args: &[Value], at: usize) -> Result<Vec<Value>, FuncError> {
    match arg(args, at)? {
        Value::Array(items) => Ok(items.clone()),
        Value::Nil | Value::NoValue => Ok(Vec::new()),
        other => Err(FuncError::Generic(format!(
            "expected a list, found {}",
            kind(other)
        ))),
    }
}

fn entries(args: &[Value], at: usize) -> Result<HashMap<String, Value>, FuncError> {
    match arg(args, at)? {
        Value::Map(map) | Value::Object(map) => Ok(map.clone()),
        Value::Nil | Value::NoValue => Ok(HashMap::new()),
        other => Err(FuncError::Generic(format!(
            "expected a map, found {}",
            kind(other)
        ))),
    }
}

/// The type of a value, never the value (templates may hold secrets).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Array(_) => "a list",
        Value::Map(_) | Value::Object(_) => "a map",
        _ => "nothing",
    }
}

/// Sprig's `empty`: nil, false, 0, "" and empty lists and maps.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Nil | Value::NoValue => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Map(m) | Value::Object(m) => m.is_empty(),
        Value::Function(_) => false,
    }
}

fn truthy(value: &Value) -> bool {
    !is_empty(value)
}

/// Spends `size` of the render's budget, or refuses when it is used up.
fn bounded(size: usize) -> Result<(), FuncError> {
    BUDGET.with(|budget| match budget.get().checked_sub(size) {
        Some(left) => {
            budget.set(left);
            Ok(())
        }
        None => Err(FuncError::Generic(format!(
            "the template would build more than {MAX_OUTPUT} items or bytes with repeat, until and indent"
        ))),
    })
}

fn regex(args: &[Value], at: usize) -> Result<regex::Regex, FuncError> {
    regex::RegexBuilder::new(&text(args, at)?)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| FuncError::Generic(e.to_string()))
}

fn list(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::Array(args.to_vec()))
}

fn dict(args: &[Value]) -> Result<Value, FuncError> {
    let map = args
        .chunks(2)
        .map(|pair| {
            (
                plain(&pair[0]),
                pair.get(1).cloned().unwrap_or_else(|| "".into()),
            )
        })
        .collect();
    Ok(Value::Map(map))
}

/// goss's `findStringSubmatch RE TEXT`: named groups by name, else groups by number from "1".
fn find_string_submatch(args: &[Value]) -> Result<Value, FuncError> {
    let re = regex(args, 0)?;
    let subject = text(args, 1)?;
    let mut found = HashMap::new();
    if let Some(captures) = re.captures(&subject) {
        let named = re.capture_names().any(|n| n.is_some());
        for (i, name) in re.capture_names().enumerate().skip(1) {
            let key = match (named, name) {
                (true, Some(name)) => name.to_string(),
                (true, None) => continue,
                (false, _) => i.to_string(),
            };
            let value = captures.get(i).map_or("", |m| m.as_str());
            found.insert(key, Value::from(value));
        }
    }
    Ok(Value::Map(found))
}

/// `trimPrefix`/`trimSuffix CUT TEXT`: the text without `CUT`, or as it is.
fn trim_with(
    args: &[Value],
    cut: for<'a> fn(&'a str, &'a str) -> Option<&'a str>,
) -> Result<Value, FuncError> {
    let (affix, subject) = (text(args, 0)?, text(args, 1)?);
    Ok(cut(&subject, &affix).unwrap_or(&subject).to_string().into())
}

fn title(args: &[Value]) -> Result<Value, FuncError> {
    let mut upper = true;
    let titled: String = text(args, 0)?
        .chars()
        .map(|c| {
            let out = if upper { c.to_ascii_uppercase() } else { c };
            upper = c.is_whitespace();
            out
        })
        .collect();
    Ok(titled.into())
}

fn repeat(args: &[Value]) -> Result<Value, FuncError> {
    let count = whole(args, 0)?.max(0) as usize;
    let unit = text(args, 1)?;
    bounded(count.saturating_mul(unit.len()))?;
    Ok(unit.repeat(count).into())
}

fn substr(args: &[Value]) -> Result<Value, FuncError> {
    let chars: Vec<char> = text(args, 2)?.chars().collect();
    let start = whole(args, 0)?.clamp(0, chars.len() as i64) as usize;
    let end = match whole(args, 1)? {
        end if end < 0 => chars.len(),
        end => (end as usize).clamp(start, chars.len()),
    };
    Ok(chars[start..end].iter().collect::<String>().into())
}

fn trunc(args: &[Value]) -> Result<Value, FuncError> {
    let chars: Vec<char> = text(args, 1)?.chars().collect();
    let n = whole(args, 0)?;
    let kept: String = match n >= 0 {
        true => chars.iter().take(n as usize).collect(),
        false => chars[chars.len().saturating_sub(n.unsigned_abs() as usize)..]
            .iter()
            .collect(),
    };
    Ok(kept.into())
}

fn indent(args: &[Value], newline: bool) -> Result<Value, FuncError> {
    let width = whole(args, 0)?.max(0) as usize;
    let subject = text(args, 1)?;
    bounded(width.saturating_mul(subject.lines().count() + 1) + subject.len())?;
    let pad = " ".repeat(width);
    let indented = subject
        .split('\n')
        .map(|line| format!("{pad}{line}"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(match newline {
        true => format!("\n{indented}"),
        false => indented,
    }
    .into())
}

/// Sprig's `split SEP TEXT`: a map `_0`, `_1`, …
fn split(args: &[Value]) -> Result<Value, FuncError> {
    let map = text(args, 1)?
        .split(&text(args, 0)?)
        .enumerate()
        .map(|(i, part)| (format!("_{i}"), Value::from(part)))
        .collect();
    Ok(Value::Map(map))
}

fn b64dec(args: &[Value]) -> Result<Value, FuncError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text(args, 0)?.trim())
        .map_err(|e| FuncError::Generic(format!("b64dec: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned().into())
}

fn json_of(value: &Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        Value::Nil | Value::NoValue | Value::Function(_) => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::String(s) => Json::String(s.clone()),
        Value::Number(n) => n
            .as_i64()
            .map(Json::from)
            .or_else(|| n.as_f64().map(Json::from))
            .unwrap_or(Json::Null),
        Value::Array(items) => Json::Array(items.iter().map(json_of).collect()),
        Value::Map(map) | Value::Object(map) => {
            Json::Object(map.iter().map(|(k, v)| (k.clone(), json_of(v))).collect())
        }
    }
}

fn fold(args: &[Value], start: i64, op: fn(i64, i64) -> Option<i64>) -> Result<Value, FuncError> {
    let mut total = start;
    for at in 0..args.len() {
        total = op(total, whole(args, at)?)
            .ok_or_else(|| FuncError::Generic("integer overflow".into()))?;
    }
    Ok(Value::from(total))
}

fn arith(args: &[Value], op: fn(i64, i64) -> Option<i64>) -> Result<Value, FuncError> {
    op(whole(args, 0)?, whole(args, 1)?)
        .map(Value::from)
        .ok_or_else(|| FuncError::Generic("integer overflow or division by zero".into()))
}

#[cfg(test)]
mod tests {
    use crate::template::{TemplateData, render};
    use serde_json::json;

    fn show(text: &str) -> String {
        let data = TemplateData {
            vars: json!({"names": ["b", "a", "b"], "conf": {"port": 80}, "blank": ""}),
            env: Default::default(),
        };
        render(text, &data).unwrap_or_else(|e| format!("error: {}", e.message))
    }

    #[test]
    fn sprig_functions_as_sprig_has_them() {
        for (template, want) in [
            (
                "{{range mkSlice \"/etc/a\" \"/etc/b\"}}[{{.}}]{{end}}",
                "[/etc/a][/etc/b]",
            ),
            ("{{\"hello!\" | upper | repeat 3}}", "HELLO!HELLO!HELLO!"),
            (
                "{{\"v1.2\" | trimPrefix \"v\"}} {{\"a.conf\" | trimSuffix \".conf\"}}",
                "1.2 a",
            ),
            (
                "{{\"hello world\" | title}} {{\"x\" | quote}} {{\"x\" | squote}}",
                "Hello World \"x\" 'x'",
            ),
            (
                "{{join \",\" .Vars.names}} {{.Vars.names | uniq | sortAlpha | join \"-\"}}",
                "b,a,b a-b",
            ),
            (
                "{{splitList \":\" \"a:b:c\" | last}} {{(split \":\" \"a:b\")._1}}",
                "c b",
            ),
            (
                "{{$d := dict \"k\" \"v\"}}{{get $d \"k\"}} {{hasKey .Vars.conf \"port\"}} {{keys .Vars.conf | join \",\"}}",
                "v true port",
            ),
            (
                "{{add 1 2 3}} {{sub 10 4}} {{mul 2 3}} {{div 7 2}} {{mod 7 2}} {{max 1 9 3}}",
                "6 6 6 3 1 9",
            ),
            (
                "{{empty .Vars.blank}} {{coalesce .Vars.blank \"x\"}} {{ternary \"y\" \"n\" true}}",
                "true x y",
            ),
            (
                "{{\"abc\" | b64enc}} {{\"YWJj\" | b64dec}} {{\"abcdef\" | substr 1 3}} {{\"abcdef\" | trunc 2}}",
                "YWJj abc bc ab",
            ),
            (
                "{{toJson .Vars.conf}} {{\"a b\" | nospace}} {{\"x\" | indent 2}}",
                "{\"port\":80} ab   x",
            ),
            (
                "{{$m := findStringSubmatch \"(?P<user>[a-z]+)@(?P<host>[a-z]+)\" \"me@db\"}}{{get $m \"host\"}}",
                "db",
            ),
            (
                "{{regexReplaceAll \"[0-9]+\" \"a1b22\" \"#\"}} {{regexFind \"[0-9]+\" \"ab12c\"}}",
                "a#b# 12",
            ),
            (
                "{{list 1 2 | first}} {{has 2 (list 1 2)}} {{until 3 | join \",\"}} {{atoi \"42\"}}",
                "1 true 0,1,2 42",
            ),
        ] {
            assert_eq!(show(template), want, "{template}");
        }
    }

    #[test]
    fn what_could_grow_without_bound_is_refused() {
        assert!(show("{{\"x\" | repeat 100000000}}").contains("more than"));
        assert!(show("{{until 100000000}}").contains("more than"));
        assert!(show("{{\"x\" | indent 100000000}}").contains("more than"));
        // Loops inside loops spend one budget.
        let nested =
            "{{range until 1000}}{{range until 1000}}{{range until 1000}}{{end}}{{end}}{{end}}";
        assert!(show(nested).contains("more than"), "{}", show(nested));
        assert!(show("{{required \"give a name\" .Vars.blank}}").contains("give a name"));
        assert!(show("{{div 1 0}}").contains("division by zero"));
    }
}
