//! goss's `xml` matcher: an XPath 1.0 expression evaluated on XML text (on sxd-xpath), its
//! result compared with `result` as text. A node-set gives its nodes as XML, or, when
//! `result` is blank, whether there are any.

use sxd_xpath::{Factory, Value, XPath};

#[derive(Debug, Clone)]
pub struct XmlQuery {
    pub xpath: String,
    pub result: String,
}

impl XmlQuery {
    /// Checks the expression compiles, so a bad one is an error where the file is loaded.
    pub fn new(xpath: String, result: String) -> Result<XmlQuery, String> {
        compile(&xpath)?;
        Ok(XmlQuery { xpath, result })
    }

    pub fn matches(&self, xml: &str) -> Result<bool, String> {
        let package =
            sxd_document::parser::parse(xml).map_err(|e| format!("cannot parse the XML: {e}"))?;
        let document = package.as_document();
        let value = compile(&self.xpath)?
            .evaluate(&sxd_xpath::Context::new(), document.root())
            .map_err(|e| format!("XPath {:?}: {e}", self.xpath))?;
        let found = match value {
            Value::Nodeset(nodes) if self.result.trim().is_empty() => return Ok(nodes.size() > 0),
            Value::Nodeset(nodes) => nodes
                .document_order()
                .iter()
                .map(|node| node.string_value())
                .collect::<String>(),
            Value::Boolean(b) => b.to_string(),
            Value::Number(n) => go_number(n),
            Value::String(s) => s,
        };
        Ok(found == self.result)
    }
}

fn compile(xpath: &str) -> Result<XPath, String> {
    Factory::new()
        .build(xpath)
        .map_err(|e| format!("bad XPath {xpath:?}: {e}"))?
        .ok_or_else(|| format!("bad XPath {xpath:?}: empty"))
}

/// A number as Go's `strconv.FormatFloat(v, 'G', -1, 64)` prints the usual ones: `2`, `2.5`.
fn go_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e21 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<order date="2019-02-01"><items>
  <book isbn="9781408845660"><title>Harry Potter</title><price>25</price></book>
  <book isbn="9780544003415"><title>Le seigneur des anneaux</title><price>18</price></book>
</items></order>"#;

    fn query(xpath: &str, result: &str) -> Result<bool, String> {
        XmlQuery::new(xpath.into(), result.into())?.matches(ORDER)
    }

    #[test]
    fn xpath_results_compare_as_goss_compares_them() {
        assert_eq!(
            query("boolean(//book[title='Le seigneur des anneaux'])", "true"),
            Ok(true)
        );
        assert_eq!(query("sum(//price)", "43"), Ok(true));
        assert_eq!(query("string(/order/@date)", "2019-02-01"), Ok(true));
        assert_eq!(query("count(//book)", "3"), Ok(false));
        assert_eq!(query("//book[price>20]", ""), Ok(true));
        assert_eq!(query("//book[price>99]", ""), Ok(false));
        assert!(XmlQuery::new("//[".into(), "x".into()).is_err());
        let broken = XmlQuery::new("/a".into(), "x".into())
            .unwrap()
            .matches("<a>");
        assert!(broken.unwrap_err().contains("cannot parse"));
    }
}
