//! goss's `gjson` matcher: a value picked out of JSON text by a [gjson](https://gjson.dev/)
//! path. The paths goss files use are supported: `a.b`, array indexes (`items.0`), `#` (a
//! list's length), `items.#.name` (that key of every element), `*` and `?` in keys,
//! `\.` for a dot inside a key, and `@this` (the whole document).

use serde_json::Value as Json;

/// The value at `path` in `document`, or `None` when nothing is there.
pub fn get(document: &Json, path: &str) -> Option<Json> {
    if path == "@this" || path.is_empty() {
        return Some(document.clone());
    }
    let parts = split(path);
    walk(document, &parts)
}

fn walk(value: &Json, parts: &[String]) -> Option<Json> {
    let Some((part, rest)) = parts.split_first() else {
        return Some(value.clone());
    };
    match (value, part.as_str()) {
        (Json::Array(items), "#") if rest.is_empty() => Some(Json::from(items.len())),
        (Json::Array(items), "#") => Some(Json::Array(
            items.iter().filter_map(|item| walk(item, rest)).collect(),
        )),
        (Json::Array(items), index) => walk(items.get(index.parse::<usize>().ok()?)?, rest),
        (Json::Object(map), key) if key.contains(['*', '?']) => map
            .iter()
            .find(|(name, _)| crate::suite::glob(key, name))
            .and_then(|(_, value)| walk(value, rest)),
        (Json::Object(map), key) => walk(map.get(key)?, rest),
        _ => None,
    }
}

/// The path's parts: split on `.`, except an escaped `\.`.
fn split(path: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => part.extend(chars.next()),
            '.' => parts.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    parts.push(part);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_as_gjson_reads_them() {
        let doc = json!({"foo": "bar", "moo": {"nested": "cow"}, "items": [{"n": 1}, {"n": 2}],
                         "a.b": 3, "count": "15"});
        assert_eq!(get(&doc, "moo.nested"), Some(json!("cow")));
        assert_eq!(get(&doc, "items.1.n"), Some(json!(2)));
        assert_eq!(get(&doc, "items.#"), Some(json!(2)));
        assert_eq!(get(&doc, "items.#.n"), Some(json!([1, 2])));
        assert_eq!(get(&doc, "a\\.b"), Some(json!(3)));
        assert_eq!(get(&doc, "m?o.nest*"), Some(json!("cow")));
        assert_eq!(get(&doc, "@this"), Some(doc.clone()));
        assert_eq!(get(&doc, "nope.x"), None);
        assert_eq!(get(&doc, "items.7"), None);
    }
}
