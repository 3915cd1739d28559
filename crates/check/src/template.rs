//! The part of Go's text/template that goss files use: `{{.Vars.a.b}}` and `{{.Env.NAME}}`
//! lookups, with `{{-`/`-}}` whitespace trimming and `{{/* comments */}}`. Anything else in an
//! action is an error naming its line, never passed through silently.

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// What templates can read.
#[derive(Debug, Clone, Default)]
pub struct TemplateData {
    /// The `--vars` file's content.
    pub vars: Json,
    /// The environment (`.Env`): a missing variable renders as empty, as in goss.
    pub env: BTreeMap<String, String>,
}

/// A bad action: its line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub message: String,
}

/// Renders `text`, whose actions start on line 1.
pub fn render(text: &str, data: &TemplateData) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut line = 1;
    while let Some(open) = rest.find("{{") {
        let (before, action) = rest.split_at(open);
        line += before.matches('\n').count();
        let Some(close) = action.find("}}") else {
            return Err(TemplateError {
                line,
                message: "unclosed action: `{{` without `}}`".into(),
            });
        };
        let inner = &action[2..close];
        let (trim_left, inner) = match inner.strip_prefix("- ") {
            Some(inner) => (true, inner),
            None => (false, inner),
        };
        let (trim_right, inner) = match inner.strip_suffix(" -") {
            Some(inner) => (true, inner),
            None => (false, inner),
        };
        out.push_str(if trim_left { before.trim_end() } else { before });
        out.push_str(
            &evaluate(inner.trim(), data).map_err(|message| TemplateError { line, message })?,
        );
        line += inner.matches('\n').count();
        rest = &action[close + 2..];
        if trim_right {
            rest = rest.trim_start();
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn evaluate(action: &str, data: &TemplateData) -> Result<String, String> {
    if action.starts_with("/*") && action.ends_with("*/") {
        return Ok(String::new());
    }
    if let Some(name) = action.strip_prefix(".Env.") {
        return Ok(data.env.get(name).cloned().unwrap_or_default());
    }
    if let Some(path) = action.strip_prefix(".Vars.") {
        let mut value = &data.vars;
        for key in path.split('.') {
            value = value
                .get(key)
                .ok_or_else(|| format!("no variable .Vars.{path} (pass it with --vars FILE)"))?;
        }
        return match value {
            Json::String(s) => Ok(s.clone()),
            Json::Number(n) => Ok(n.to_string()),
            Json::Bool(b) => Ok(b.to_string()),
            _ => Err(format!(".Vars.{path} is not a string, number or boolean")),
        };
    }
    Err(format!(
        "unsupported template action {{{{{action}}}}}: only .Vars.NAME and .Env.NAME lookups are rendered"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data() -> TemplateData {
        TemplateData {
            vars: json!({"port": 8080, "app": {"user": "www"}, "list": [1]}),
            env: BTreeMap::from([("HOME".to_string(), "/root".to_string())]),
        }
    }

    #[test]
    fn renders_vars_env_and_comments() {
        let text = "a: {{.Vars.port}}\nb: {{ .Vars.app.user }}\nc: {{.Env.HOME}}{{.Env.NOPE}}\n{{/* note */}}";
        assert_eq!(
            render(text, &data()).unwrap(),
            "a: 8080\nb: www\nc: /root\n"
        );
        assert_eq!(
            render("x  {{- .Vars.port -}}  y", &data()).unwrap(),
            "x8080y"
        );
    }

    #[test]
    fn errors_name_the_line() {
        let missing = render("a: 1\nb: {{.Vars.nope}}\n", &data()).unwrap_err();
        assert_eq!(missing.line, 2);
        assert!(missing.message.contains(".Vars.nope"), "{missing:?}");
        let list = render("{{.Vars.list}}", &data()).unwrap_err();
        assert!(list.message.contains("not a string"), "{list:?}");
        let unsupported = render("\n\n{{ range .Vars.list }}", &data()).unwrap_err();
        assert_eq!(unsupported.line, 3);
        assert!(render("{{ .Vars.port", &data()).is_err());
    }
}
