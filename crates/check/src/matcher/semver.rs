//! goss's `semver-constraint` matcher: blang/semver's ranges. Comparators are separated by
//! spaces (all must hold) and alternatives by `||`: `">1.0.0 <2.0.0 !=1.5.0"`,
//! `">5.0.0 || <1.5.0"`. Operators: `>`, `>=`, `<`, `<=`, `=`, `==`, `!=`, `!`, none (equal);
//! `x` in a version (`1.2.x`, `1.x`) stands for any number there. Versions are strict
//! semantic versions, as blang's `Parse` wants them.

use semver::Version;

#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    /// Alternatives, each a list of comparators that must all hold.
    any_of: Vec<Vec<(Op, Version)>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Range {
    pub fn parse(text: &str) -> Result<Range, String> {
        let bad = |why: &str| format!("bad semver constraint {text:?}: {why}");
        let mut any_of = Vec::new();
        for alternative in text.split("||") {
            let mut all = Vec::new();
            let mut words = alternative.split_whitespace().peekable();
            while let Some(word) = words.next() {
                // `>= 1.2.3`: an operator on its own takes the next word.
                let word = match word.trim_start_matches(['<', '>', '=', '!']).is_empty() {
                    true => format!(
                        "{word}{}",
                        words
                            .next()
                            .ok_or_else(|| bad("an operator without a version"))?
                    ),
                    false => word.to_string(),
                };
                all.extend(comparators(&word).map_err(|e| bad(&e))?);
            }
            if all.is_empty() {
                return Err(bad("an empty alternative"));
            }
            any_of.push(all);
        }
        Ok(Range { any_of })
    }

    pub fn holds(&self, version: &Version) -> bool {
        self.any_of.iter().any(|all| {
            all.iter().all(|(op, bound)| {
                let order = version.cmp_precedence(bound);
                match op {
                    Op::Eq => order.is_eq(),
                    Op::Ne => order.is_ne(),
                    Op::Gt => order.is_gt(),
                    Op::Ge => order.is_ge(),
                    Op::Lt => order.is_lt(),
                    Op::Le => order.is_le(),
                }
            })
        })
    }
}

/// One comparator; a wildcard version (`1.2.x`) becomes the range it stands for.
fn comparators(word: &str) -> Result<Vec<(Op, Version)>, String> {
    let (op, version) = match word {
        w if w.starts_with(">=") => (Op::Ge, &w[2..]),
        w if w.starts_with("<=") => (Op::Le, &w[2..]),
        w if w.starts_with("!=") => (Op::Ne, &w[2..]),
        w if w.starts_with("==") => (Op::Eq, &w[2..]),
        w if w.starts_with('>') => (Op::Gt, &w[1..]),
        w if w.starts_with('<') => (Op::Lt, &w[1..]),
        w if w.starts_with('=') => (Op::Eq, &w[1..]),
        w if w.starts_with('!') => (Op::Ne, &w[1..]),
        w => (Op::Eq, w),
    };
    let parts: Vec<&str> = version.split('.').collect();
    let wild = parts
        .iter()
        .position(|p| *p == "x" || *p == "X" || *p == "*");
    let Some(at) = wild else {
        return Version::parse(version)
            .map(|v| vec![(op, v)])
            .map_err(|e| format!("{version:?}: {e}"));
    };
    // `1.2.x` is `>=1.2.0 <1.3.0`; with `>`/`<` the edge that makes sense, as blang does.
    let numbers: Vec<u64> = parts[..at]
        .iter()
        .map(|p| p.parse().map_err(|_| format!("{version:?}: not a version")))
        .collect::<Result<_, _>>()?;
    let low = |n: &[u64]| {
        Version::new(
            n.first().copied().unwrap_or(0),
            n.get(1).copied().unwrap_or(0),
            0,
        )
    };
    let mut next = numbers.clone();
    match next.last_mut() {
        Some(last) => *last += 1,
        None => return Ok(vec![(Op::Ge, Version::new(0, 0, 0))]),
    }
    let (start, end) = (low(&numbers), low(&next));
    Ok(match op {
        Op::Eq => vec![(Op::Ge, start), (Op::Lt, end)],
        Op::Ne => return Err(format!("{word:?}: != with a wildcard")),
        Op::Gt => vec![(Op::Ge, end)],
        Op::Ge => vec![(Op::Ge, start)],
        Op::Lt => vec![(Op::Lt, start)],
        Op::Le => vec![(Op::Lt, end)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(range: &str, version: &str) -> bool {
        Range::parse(range)
            .unwrap()
            .holds(&Version::parse(version).unwrap())
    }

    #[test]
    fn ranges_as_blang_reads_them() {
        assert!(holds(">1.0.0 <2.0.0 !=1.5.0", "1.2.3"));
        assert!(!holds(">1.0.0 <2.0.0 !=1.5.0", "1.5.0"));
        assert!(holds(">5.0.0 || <1.5.0", "1.0.1"));
        assert!(!holds(">5.0.0 || <1.5.0", "3.0.0"));
        assert!(holds(">= 1.2.0", "1.2.0"));
        assert!(holds("1.2.x", "1.2.9") && !holds("1.2.x", "1.3.0"));
        assert!(holds("<=1.x", "1.9.0") && !holds("<=1.x", "2.0.0"));
        assert!(holds("1.0.0", "1.0.0") && !holds("1.0.0", "1.0.1"));
        assert!(!holds(">1.0.0", "1.0.0-rc1"));
        assert!(Range::parse(">=").is_err());
        assert!(Range::parse("1.2").is_err(), "blang wants x.y.z");
        assert!(Range::parse("").is_err());
    }
}
