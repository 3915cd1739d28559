//! Name and tag patterns for member lists and queries. Serf takes anchored regular
//! expressions; Phoenix matches whole values with `*` (or the regex `.*`) as a wildcard, which
//! covers what operators write without a regex engine in the agent.

use std::collections::BTreeMap;

/// Whole-string match where `*` (or `.*`) stands for any run of characters.
pub fn glob(pattern: &str, value: &str) -> bool {
    let pattern = pattern.replace(".*", "*");
    let pattern = pattern.trim_start_matches('^').trim_end_matches('$');
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || !value[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// True when every pattern names a tag whose value it matches.
pub fn tags_match(patterns: &BTreeMap<String, String>, tags: &BTreeMap<String, String>) -> bool {
    patterns
        .iter()
        .all(|(key, pattern)| tags.get(key).is_some_and(|value| glob(pattern, value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_values() {
        assert!(glob("web*", "web-1") && glob("^web-.*$", "web-1") && !glob("web", "web-1"));
        assert!(glob("*-1", "web-1") && glob("a*c*e", "abcde") && !glob("a*c*e", "abcd"));
        let tags: BTreeMap<String, String> = [("role".to_string(), "web".to_string())].into();
        let want = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(tags_match(&want("role", "w*"), &tags));
        assert!(!tags_match(&want("role", "db"), &tags));
        assert!(
            !tags_match(&want("dc", "*"), &tags),
            "a missing tag never matches"
        );
        assert!(tags_match(&BTreeMap::new(), &tags));
    }
}
