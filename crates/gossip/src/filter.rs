//! Name, status and tag patterns, as Serf reads them: regular expressions (the `regex`
//! crate's syntax, RE2's like Go's `regexp`). A member list anchors each one as Serf writes it,
//! `^PATTERN$` (so `web|lb` means `^web` or `lb$`, exactly as in Serf); a query's tag filter
//! is unanchored, as in Serf. A tag a member lacks is matched as the empty string.

use std::collections::BTreeMap;

use regex::Regex;

/// Largest compiled pattern: patterns come from RPC clients and, in queries, from other
/// members, so their cost is bounded (matching is linear in the value either way).
const SIZE_LIMIT: usize = 256 * 1024;

/// Compiles `pattern`, or says why it is not one.
pub fn compile(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| format!("Failed to compile regex: {e}"))
}

/// Serf's member-list pattern: `^PATTERN$`.
pub fn anchored(pattern: &str) -> Result<Regex, String> {
    compile(&format!("^{pattern}$"))
}

/// Compiled tag patterns, by tag name.
pub struct TagPatterns(Vec<(String, Regex)>);

impl TagPatterns {
    /// `make` compiles each pattern (anchored for member lists, as is for queries).
    pub fn new(
        patterns: &BTreeMap<String, String>,
        make: impl Fn(&str) -> Result<Regex, String>,
    ) -> Result<Self, String> {
        let compiled = patterns
            .iter()
            .map(|(tag, pattern)| Ok((tag.clone(), make(pattern)?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(TagPatterns(compiled))
    }

    /// True when every pattern matches its tag's value (`""` when the tag is absent).
    pub fn match_all(&self, tags: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(tag, pattern)| pattern.is_match(tags.get(tag).map_or("", String::as_str)))
    }
}

/// A query's tag filter, as Serf applies it on the member asked: unanchored patterns; one
/// that does not compile matches nothing.
pub fn query_tags_match(
    patterns: &BTreeMap<String, String>,
    tags: &BTreeMap<String, String>,
) -> bool {
    match TagPatterns::new(patterns, compile) {
        Ok(patterns) => patterns.match_all(tags),
        Err(error) => {
            tracing::warn!(%error, "query with a tag filter that is no regular expression");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn member_list_patterns_are_anchored_as_serf_writes_them() {
        let web = tags(&[("role", "web")]);
        let lb = tags(&[("role", "lb")]);
        let webby = tags(&[("role", "webby")]);
        let matches = |pattern: &str, t: &BTreeMap<String, String>| {
            TagPatterns::new(&tags(&[("role", pattern)]), anchored)
                .unwrap()
                .match_all(t)
        };
        assert!(matches("w.b", &web) && !matches("w.b", &webby));
        assert!(matches("web|lb", &web) && matches("web|lb", &lb));
        // `^web|lb$`: a prefix `web` is enough, as in Serf.
        assert!(matches("web|lb", &webby));
        assert!(!matches("we", &web), "anchored at both ends");
        assert!(anchored("n[12]").unwrap().is_match("n2"));
        assert!(!anchored("n[12]").unwrap().is_match("n3"));
        // A tag a member lacks is the empty string.
        let dc = |p: &str| TagPatterns::new(&tags(&[("dc", p)]), anchored).unwrap();
        assert!(dc(".*").match_all(&web) && !dc(".+").match_all(&web));
        assert!(TagPatterns::new(&tags(&[("role", "(")]), anchored).is_err());
    }

    #[test]
    fn query_tag_filters_are_unanchored_and_bad_ones_match_nothing() {
        let web = tags(&[("role", "web-1")]);
        assert!(query_tags_match(&tags(&[("role", "web")]), &web));
        assert!(query_tags_match(&tags(&[("role", "^web-\\d$")]), &web));
        assert!(!query_tags_match(&tags(&[("role", "^db")]), &web));
        assert!(!query_tags_match(&tags(&[("role", "(")]), &web));
        assert!(query_tags_match(&BTreeMap::new(), &web));
        // A pattern too large to compile is refused, not built.
        let huge = r"(?:\w{50}){50}";
        assert!(compile(huge).is_err());
    }
}
