//! Go's text/template, as goss renders its files first: `{{.Vars.a.b}}`, `{{.Env.NAME}}`,
//! `if`/`else`/`range`/`with`, variables, pipelines, Go's built-in functions (`eq`, `len`,
//! `index`, `printf`…) and goss's own (`getEnv`, `readFile`, `regexMatch`, `toLower`,
//! `toUpper`, and more in `sprig.rs`) and Sprig's, on the [gtmpl](https://crates.io/crates/gtmpl)
//! engine.
//! A missing key is an error (goss renders with `missingkey=error`), and so is anything the
//! engine does not know, naming its line. `template`, `define` and `block` are refused: goss
//! files do not use them, and a template that calls itself would never end.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use gtmpl::{Context, FuncError, Template, Value};
use serde_json::Value as Json;

/// What templates can read.
#[derive(Debug, Clone, Default)]
pub struct TemplateData {
    /// The `--vars` files' content (later files and `--vars-inline` win, key by key).
    pub vars: Json,
    /// The environment (`.Env`).
    pub env: BTreeMap<String, String>,
}

/// A bad action: its line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub message: String,
}

/// Renders `text`, whose first line is line 1.
pub fn render(text: &str, data: &TemplateData) -> Result<String, TemplateError> {
    // Files without actions (most) are taken as they are.
    if !text.contains("{{") {
        return Ok(text.to_string());
    }
    refuse_nesting(text)?;
    let guarded = guard_lexer(text)?;
    let text = guarded.as_ref();
    let mut template = Template::default();
    for (name, function) in FUNCTIONS.iter().chain(crate::sprig::FUNCTIONS) {
        template.add_func(name, *function);
    }
    template
        .parse(text)
        .map_err(|e| located(text, &e.to_string()))?;
    ENV.with(|env| env.replace(data.env.clone()));
    crate::sprig::reset_budget();
    let rendered = template.render(&Context::from(root(data)));
    ENV.with(|env| env.borrow_mut().clear());
    rendered.map_err(|e| located(text, &e.to_string()))
}

/// Deepest nesting of `if`/`range`/`with` blocks, and of parentheses in one action: the
/// engine recurses on both, and a hostile file must get an error, not a stack overflow.
const MAX_DEPTH: usize = 64;

/// Refuses `template`, `define` and `block` actions (see the module's note) and nesting
/// deeper than [`MAX_DEPTH`], before the engine sees the text.
fn refuse_nesting(text: &str) -> Result<(), TemplateError> {
    let mut line = 1;
    let mut rest = text;
    let mut depth = 0usize;
    while let Some(open) = rest.find("{{") {
        line += rest[..open].matches('\n').count();
        let after = &rest[open + 2..];
        let action = after.trim_start_matches('-').trim_start();
        let body = &action[..action.find("}}").unwrap_or(action.len())];
        let word: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        let refuse = |message: String| Err(TemplateError { line, message });
        match word.as_str() {
            "template" | "define" | "block" => {
                return refuse(format!(
                    "unsupported template action `{word}` in a goss file"
                ));
            }
            "if" | "range" | "with" => depth += 1,
            "end" => depth = depth.saturating_sub(1),
            _ => {}
        }
        let mut parens = 0usize;
        let mut deepest = 0usize;
        for c in body.chars() {
            match c {
                '(' => {
                    parens += 1;
                    deepest = deepest.max(parens);
                }
                ')' => parens = parens.saturating_sub(1),
                _ => {}
            }
        }
        if depth > MAX_DEPTH || deepest > MAX_DEPTH {
            return refuse(format!("template nested more than {MAX_DEPTH} deep"));
        }
        rest = after;
    }
    Ok(())
}

/// Works around gtmpl's lexer, which steps back one byte after any character: an action left
/// open at the end (`{{ `) would make it spin forever, and a character of several bytes in an
/// action (outside quotes) would make it panic, so both are refused; and before a `{{- ` it
/// trims one byte too many after such a character, so an empty comment goes between the two
/// (same output, same lines). This follows its states (text, comments, actions, quoted
/// strings) just far enough; every other lexing error is the engine's own.
fn guard_lexer(text: &str) -> Result<Cow<'_, str>, TemplateError> {
    let line_at = |offset: usize| 1 + text[..offset].matches('\n').count();
    let mut patched = String::new();
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = text[at..].find("{{") {
        let open = at + found;
        let action = &text[open + 2..];
        if action.starts_with("- ") {
            let before = text[at..open].trim_end();
            if before.chars().last().is_some_and(|c| !c.is_ascii()) {
                let cut = at + before.len();
                patched.push_str(&text[copied..cut]);
                patched.push_str("{{/**/}}");
                copied = cut;
            }
        }
        let unmarked = action.strip_prefix("- ").unwrap_or(action);
        if let Some(comment) = unmarked.strip_prefix("/*") {
            match comment.find("*/") {
                Some(end) => at = text.len() - comment.len() + end + 2,
                None => break, // the engine's "unclosed comment"
            }
            continue;
        }
        match end_of_action(action) {
            ActionEnd::Closed(after) => at = text.len() - after.len(),
            ActionEnd::EngineError => break,
            ActionEnd::Unclosed => {
                return Err(TemplateError {
                    line: line_at(open),
                    message: "unclosed action: `{{` without its `}}`".to_string(),
                });
            }
            ActionEnd::BadLiteral(offset) => {
                return Err(TemplateError {
                    line: line_at(open + 2 + offset),
                    message: "a quoted string with backslashes must be ASCII and not end in a \
                              backslash"
                        .to_string(),
                });
            }
            ActionEnd::NotAscii(offset) => {
                return Err(TemplateError {
                    line: line_at(open + 2 + offset),
                    message: "a character that is not ASCII in an action, outside a quoted \
                              string"
                        .to_string(),
                });
            }
        }
    }
    if copied == 0 {
        return Ok(Cow::Borrowed(text));
    }
    patched.push_str(&text[copied..]);
    Ok(Cow::Owned(patched))
}

enum ActionEnd<'a> {
    /// The text after the action's `}}`.
    Closed(&'a str),
    /// The engine stops with an error of its own before the end of the text.
    EngineError,
    /// The text ends inside the action.
    Unclosed,
    /// A character that is not ASCII, at this offset, outside quotes.
    NotAscii(usize),
    /// A quoted string or character constant, at this offset, that the engine cannot unquote.
    BadLiteral(usize),
}

/// Where the action starting at `action` (just after its `{{`) ends, quoted strings and
/// character constants skipped as gtmpl's lexer skips them.
fn end_of_action(action: &str) -> ActionEnd<'_> {
    let mut chars = action.char_indices();
    while let Some((at, c)) = chars.next() {
        let literal_end = match c {
            '}' if action[at..].starts_with("}}") => return ActionEnd::Closed(&action[at + 2..]),
            '"' | '\'' => {
                let mut escaped = false;
                loop {
                    match chars.next() {
                        Some((_, '\\')) => {
                            escaped = true;
                            continue;
                        }
                        Some((_, '\n')) | None => return ActionEnd::EngineError,
                        Some((end, q)) if q == c && !escaped => break end,
                        _ => {}
                    }
                    escaped = false;
                }
            }
            '`' => match chars.find(|(_, c)| *c == '`') {
                Some((end, _)) => end,
                None => return ActionEnd::EngineError,
            },
            c if !c.is_ascii() => return ActionEnd::NotAscii(at),
            _ => continue,
        };
        if !unquotable(&action[at + 1..literal_end]) {
            return ActionEnd::BadLiteral(at);
        }
    }
    ActionEnd::Unclosed
}

/// Whether gtmpl's unquoting can take a literal's content without panicking: it reads two
/// bytes at every backslash, and hexadecimal escapes byte by byte.
fn unquotable(content: &str) -> bool {
    !content.contains('\\') || (content.is_ascii() && !content.ends_with('\\'))
}

/// An engine error with its line: the one the parser names (`template: :3:…`), else the
/// first line that mentions what went wrong. Values are never quoted back (the environment
/// may hold secrets).
fn located(text: &str, error: &str) -> TemplateError {
    let after_name = error.strip_prefix("template: :").unwrap_or("");
    let digits: String = after_name
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if let Ok(line) = digits.parse() {
        let message = after_name[digits.len()..].trim_start_matches(':').trim();
        return TemplateError {
            line,
            message: message.to_string(),
        };
    }
    if let Some(rest) = error.split("no field ").nth(1) {
        let name = rest.split_whitespace().next().unwrap_or_default();
        return TemplateError {
            line: line_mentioning(text, &format!(".{name}")),
            message: format!(
                "no key {name:?}: a missing .Vars key (pass it with --vars FILE) or .Env variable"
            ),
        };
    }
    let message = error.split(" for {").next().unwrap_or(error);
    TemplateError {
        line: 1,
        message: message.to_string(),
    }
}

/// The first line whose text holds `needle` (1 when none does).
fn line_mentioning(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .map_or(1, |at| at + 1)
}

/// The template's `.`: `.Vars` and `.Env`.
fn root(data: &TemplateData) -> Value {
    let env = data
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    Value::Object(HashMap::from([
        // No --vars: an empty map, so `.Vars.x` is a missing key (with its name), not a
        // lookup in nothing.
        (
            "Vars".to_string(),
            match &data.vars {
                Json::Null => Value::Object(HashMap::new()),
                vars => value_of(vars),
            },
        ),
        ("Env".to_string(), Value::Object(env)),
    ]))
}

fn value_of(json: &Json) -> Value {
    match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (_, Some(u), _) => Value::from(u),
            (_, _, Some(f)) => Value::from(f),
            _ => Value::Nil,
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::Array(items.iter().map(value_of).collect()),
        Json::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), value_of(v))).collect())
        }
    }
}

type Function = fn(&[Value]) -> Result<Value, FuncError>;

/// goss's functions, and the Sprig ones goss files use most.
const FUNCTIONS: &[(&str, Function)] = &[
    ("getEnv", get_env),
    ("readFile", read_file),
    ("regexMatch", regex_match),
    ("toLower", to_lower),
    ("toUpper", to_upper),
    ("lower", to_lower),
    ("upper", to_upper),
    ("trim", trim),
    ("contains", contains),
    ("hasPrefix", has_prefix),
    ("hasSuffix", has_suffix),
    ("replace", replace),
    ("default", default),
];

fn text(args: &[Value], at: usize) -> Result<String, FuncError> {
    match args.get(at) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Ok(other.to_string()),
        None => Err(FuncError::AtLeastXArgs("the function".into(), at + 1)),
    }
}

thread_local! {
    /// The environment of the render under way, for `getEnv` (a plain function).
    static ENV: std::cell::RefCell<BTreeMap<String, String>> =
        const { std::cell::RefCell::new(BTreeMap::new()) };
}

/// goss's `getEnv NAME [DEFAULT]`, from the same environment as `.Env`.
fn get_env(args: &[Value]) -> Result<Value, FuncError> {
    let name = text(args, 0)?;
    let fallback = args.get(1).map(|_| text(args, 1)).transpose()?;
    let found = ENV.with(|env| env.borrow().get(&name).cloned());
    Ok(Value::from(found.or(fallback).unwrap_or_default()))
}

/// goss's `readFile PATH`: the file's text, trimmed.
fn read_file(args: &[Value]) -> Result<Value, FuncError> {
    let path = text(args, 0)?;
    std::fs::read_to_string(&path)
        .map(|t| Value::from(t.trim()))
        .map_err(|e| FuncError::Generic(format!("readFile {path}: {e}")))
}

/// goss's `regexMatch PATTERN TEXT`.
fn regex_match(args: &[Value]) -> Result<Value, FuncError> {
    let (pattern, subject) = (text(args, 0)?, text(args, 1)?);
    let re = regex::RegexBuilder::new(&pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| FuncError::Generic(format!("regexMatch: {e}")))?;
    Ok(Value::from(re.is_match(&subject)))
}

fn to_lower(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 0)?.to_lowercase()))
}

fn to_upper(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 0)?.to_uppercase()))
}

fn trim(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 0)?.trim()))
}

/// Sprig's argument order: `contains NEEDLE HAYSTACK`, so `.x | contains "a"` reads well.
fn contains(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 1)?.contains(&text(args, 0)?)))
}

fn has_prefix(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 1)?.starts_with(&text(args, 0)?)))
}

fn has_suffix(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(text(args, 1)?.ends_with(&text(args, 0)?)))
}

/// Sprig's `replace OLD NEW TEXT`.
fn replace(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(
        text(args, 2)?.replace(&text(args, 0)?, &text(args, 1)?),
    ))
}

/// Sprig's `default DEFAULT VALUE`: the value unless it is empty.
fn default(args: &[Value]) -> Result<Value, FuncError> {
    let fallback = args.first().cloned().unwrap_or(Value::Nil);
    Ok(match args.get(1) {
        None | Some(Value::Nil) => fallback,
        Some(Value::String(s)) if s.is_empty() => fallback,
        Some(Value::Bool(false)) => fallback,
        Some(value) => value.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data() -> TemplateData {
        TemplateData {
            vars: json!({"port": 8080, "app": {"user": "www"}, "list": [1, 2], "on": true}),
            env: BTreeMap::from([("HOME".to_string(), "/root".to_string())]),
        }
    }

    #[test]
    fn renders_vars_env_and_comments() {
        let text = "a: {{.Vars.port}}\nb: {{ .Vars.app.user }}\nc: {{.Env.HOME}}\n{{/* note */}}";
        assert_eq!(
            render(text, &data()).unwrap(),
            "a: 8080\nb: www\nc: /root\n"
        );
        assert_eq!(
            render("x  {{- .Vars.port -}}  y", &data()).unwrap(),
            "x8080y"
        );
        assert_eq!(
            render("no actions: {x}", &data()).unwrap(),
            "no actions: {x}"
        );
    }

    #[test]
    fn control_flow_variables_and_functions_as_in_go() {
        let text = "{{if .Vars.on}}on{{else}}off{{end}} \
            {{range $i, $v := .Vars.list}}[{{$i}}:{{$v}}]{{end}} \
            {{$u := .Vars.app.user}}{{$u | toUpper}} {{len .Vars.list}} \
            {{if eq .Vars.port 8080}}eq{{end}} {{getEnv \"HOME\"}} {{getEnv \"NOPE\" \"dflt\"}} \
            {{regexMatch \"^w+$\" .Vars.app.user}} {{\"a-b\" | replace \"-\" \"_\"}} \
            {{printf \"%d\" .Vars.port}}";
        assert_eq!(
            render(text, &data()).unwrap(),
            "on [0:1][1:2] WWW 2 eq /root dflt true a_b 8080"
        );
    }

    #[test]
    fn errors_name_the_line_and_never_quote_values() {
        let missing = render("a: 1\nb: {{.Vars.nope}}\n", &data()).unwrap_err();
        assert_eq!(missing.line, 2, "{missing:?}");
        assert!(missing.message.contains("\"nope\""), "{missing:?}");
        assert!(
            !missing.message.contains("www"),
            "no values quoted: {missing:?}"
        );
        let env = render("{{.Env.NOPE}}", &data()).unwrap_err();
        assert!(
            env.message.contains("NOPE") && !env.message.contains("/root"),
            "{env:?}"
        );
        let bad = render("\n\n{{ if }}", &data()).unwrap_err();
        assert_eq!(bad.line, 3, "{bad:?}");
        assert!(render("{{ .Vars.port", &data()).is_err());
        // Left open at the end, an action once made the engine's lexer spin forever.
        let open_at_the_end = [
            ("{{ ", 1),
            ("a\n{{ ", 2),
            ("{{ 1", 1),
            ("{{- ", 1),
            ("{{ \"}}\" ", 1),
            ("{{ '}' ", 1),
            ("{{ `}}` \n", 1),
        ];
        for (open, line) in open_at_the_end {
            let error = render(open, &data()).unwrap_err();
            assert!(
                error.message.contains("unclosed action"),
                "{open:?}: {error:?}"
            );
            assert_eq!(error.line, line, "{open:?}");
        }
        assert!(render("{{ \"x", &data()).is_err());
        // Not ASCII outside quotes once made the engine's lexer panic; inside them it is fine.
        let wide = render("a\n{{ s\u{fffd}.' }}", &data()).unwrap_err();
        assert_eq!(wide.line, 2, "{wide:?}");
        assert!(wide.message.contains("not ASCII"), "{wide:?}");
        assert_eq!(render("{{ \"é\" }}{{/* é */}}é", &data()).unwrap(), "éé");
        // Backslashes in literals: fine in ASCII, refused where gtmpl's unquoting panics.
        assert_eq!(render("{{ \"a\\tb\" }}", &data()).unwrap(), "a\tb");
        for literal in [
            "{{ `\\` }}",
            "{{ \"\\é\" }}",
            "{{ `\\x41é` }}",
            "{{ '\\é' }}",
        ] {
            let error = render(literal, &data()).unwrap_err();
            assert!(
                error.message.contains("backslashes"),
                "{literal}: {error:?}"
            );
        }
        // Before a left trim, gtmpl cut a character of several bytes in two (a panic).
        assert_eq!(
            render("café \n {{- .Vars.port}} é{{- \"x\"}}", &data()).unwrap(),
            "café8080 éx"
        );
        assert!(render("{{/* x", &data()).is_err());
        assert_eq!(render("{{ \"}}\" }}{{/* {{ */}}", &data()).unwrap(), "}}");
        let deep = "{{if 1}}".repeat(20_000) + &"{{end}}".repeat(20_000);
        let error = render(&deep, &data()).unwrap_err();
        assert!(
            error.message.contains("nested more than 64 deep"),
            "{error:?}"
        );
        let parens = format!("{{{{ {}1{} }}}}", "(".repeat(20_000), ")".repeat(20_000));
        assert!(
            render(&parens, &data())
                .unwrap_err()
                .message
                .contains("nested")
        );
        let nested = render("a\n{{define \"x\"}}{{template \"x\"}}{{end}}", &data()).unwrap_err();
        assert_eq!(nested.line, 2);
        assert!(nested.message.contains("`define`"), "{nested:?}");
    }
}
