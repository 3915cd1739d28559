//! Pass/fail criteria in k6's words: `http_req_failed: rate<0.01`,
//! `http_req_duration: p(99)<250`, `http_reqs: count>=100`, optionally for one request,
//! `http_req_duration{name:checkout}`.

use std::fmt;

use serde::Serialize;

/// One criterion: `metric{name:REQUEST}` `aggregation` `operator` `value`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    pub metric: Metric,
    /// Only the requests of this name (`{name:...}`), or all of them.
    pub request: Option<String>,
    pub aggregation: Aggregation,
    pub operator: Operator,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Metric {
    /// `http_req_failed`: the share of requests that failed (an error status or no answer).
    #[serde(rename = "http_req_failed")]
    Failed,
    /// `http_req_duration`: latency from each request's due time, in milliseconds.
    #[serde(rename = "http_req_duration")]
    Duration,
    /// `http_reqs`: completed requests, how many or how many a second.
    #[serde(rename = "http_reqs")]
    Requests,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Rate,
    Count,
    Avg,
    Min,
    Med,
    Max,
    /// A percentile, 0 to 100.
    Percentile(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Operator {
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
    #[serde(rename = "==")]
    Equal,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ThresholdError(String);

impl Threshold {
    /// Parses `metric` (a key of `[thresholds]`) and one of its expressions.
    pub fn parse(metric: &str, expression: &str) -> Result<Threshold, ThresholdError> {
        let error = |why: String| ThresholdError(why);
        let (name, request) = match metric.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .and_then(|r| r.strip_prefix("name:"))
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        error(format!(
                            "{metric:?}: select one request with {{name:NAME}}, like \"{name}{{name:checkout}}\""
                        ))
                    })?;
                (name, Some(inner.to_string()))
            }
            None => (metric, None),
        };
        let metric = [Metric::Failed, Metric::Duration, Metric::Requests]
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                error(format!(
                    "unknown metric {name:?}: write http_req_failed, http_req_duration or http_reqs"
                ))
            })?;
        let compact: String = expression.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact.find(['<', '>', '=']).ok_or_else(|| {
            error(format!(
                "{expression:?} has no comparison: write like \"p(99)<250\""
            ))
        })?;
        let (left, right) = compact.split_at(at);
        // Two-character signs first: `<=` is not `<` and `=5`.
        let (operator, value) = [
            Operator::LessOrEqual,
            Operator::GreaterOrEqual,
            Operator::Equal,
            Operator::Less,
            Operator::Greater,
        ]
        .into_iter()
        .find_map(|op| right.strip_prefix(op.sign()).map(|v| (op, v)))
        .ok_or_else(|| {
            error(format!(
                "{expression:?}: the comparison is one of < <= > >= =="
            ))
        })?;
        let value: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| error(format!("{expression:?}: {value:?} is not a number")))?;
        let aggregation = aggregation(left).ok_or_else(|| {
            error(format!(
                "{expression:?}: {left:?} is not an aggregation of {name} (write {})",
                allowed(metric)
            ))
        })?;
        if !fits(metric, aggregation) {
            return Err(error(format!(
                "{expression:?}: {name} has no {left}: write {}",
                allowed(metric)
            )));
        }
        Ok(Threshold {
            metric,
            request,
            aggregation,
            operator,
            value,
        })
    }

    /// Whether `actual` meets the criterion.
    pub fn holds(&self, actual: f64) -> bool {
        match self.operator {
            Operator::Less => actual < self.value,
            Operator::LessOrEqual => actual <= self.value,
            Operator::Greater => actual > self.value,
            Operator::GreaterOrEqual => actual >= self.value,
            Operator::Equal => (actual - self.value).abs() < 1e-9,
        }
    }
}

fn aggregation(text: &str) -> Option<Aggregation> {
    use Aggregation::*;
    if let Some(named) = [Rate, Count, Avg, Min, Med, Max]
        .into_iter()
        .find(|a| a.name() == text)
    {
        return Some(named);
    }
    let p: f64 = text.strip_prefix("p(")?.strip_suffix(')')?.parse().ok()?;
    (0.0..=100.0).contains(&p).then_some(Percentile(p))
}

impl Metric {
    /// k6's name.
    fn name(self) -> &'static str {
        match self {
            Metric::Failed => "http_req_failed",
            Metric::Duration => "http_req_duration",
            Metric::Requests => "http_reqs",
        }
    }
}

impl Aggregation {
    /// As written in an expression: `avg`, `p(99)`, ….
    fn name(self) -> String {
        match self {
            Aggregation::Rate => "rate".into(),
            Aggregation::Count => "count".into(),
            Aggregation::Avg => "avg".into(),
            Aggregation::Min => "min".into(),
            Aggregation::Med => "med".into(),
            Aggregation::Max => "max".into(),
            Aggregation::Percentile(p) => format!("p({p})"),
        }
    }
}

impl Operator {
    fn sign(self) -> &'static str {
        match self {
            Operator::Less => "<",
            Operator::LessOrEqual => "<=",
            Operator::Greater => ">",
            Operator::GreaterOrEqual => ">=",
            Operator::Equal => "==",
        }
    }
}

fn fits(metric: Metric, aggregation: Aggregation) -> bool {
    match metric {
        Metric::Failed => aggregation == Aggregation::Rate,
        Metric::Requests => matches!(aggregation, Aggregation::Rate | Aggregation::Count),
        Metric::Duration => !matches!(aggregation, Aggregation::Rate | Aggregation::Count),
    }
}

fn allowed(metric: Metric) -> &'static str {
    match metric {
        Metric::Failed => "rate",
        Metric::Requests => "count or rate",
        Metric::Duration => "avg, min, med, max or p(N)",
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.metric.name())?;
        if let Some(name) = &self.request {
            write!(f, "{{name:{name}}}")?;
        }
        let (aggregation, sign) = (self.aggregation.name(), self.operator.sign());
        write!(f, " {aggregation}{sign}{}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k6_expressions_parse_and_judge() {
        let p99 = Threshold::parse("http_req_duration", "p(99) < 250").unwrap();
        assert_eq!(p99.aggregation, Aggregation::Percentile(99.0));
        assert!(p99.holds(249.9) && !p99.holds(250.0));
        assert_eq!(p99.to_string(), "http_req_duration p(99)<250");
        let failed = Threshold::parse("http_req_failed{name:checkout}", "rate<=0.01").unwrap();
        assert_eq!(failed.request.as_deref(), Some("checkout"));
        assert!(failed.holds(0.01) && !failed.holds(0.0101));
        let count = Threshold::parse("http_reqs", "count>=100").unwrap();
        assert!(count.holds(100.0) && !count.holds(99.0));
    }

    #[test]
    fn mistakes_say_what_to_write() {
        let cases = [
            ("http_req_durations", "p(99)<1", "unknown metric"),
            ("http_req_duration", "p(99)", "no comparison"),
            ("http_req_duration", "p(99)<fast", "not a number"),
            ("http_req_duration", "p(101)<5", "not an aggregation"),
            ("http_req_failed", "p(99)<5", "has no p(99)"),
            ("http_reqs", "avg<5", "count or rate"),
            ("http_req_duration{checkout}", "avg<5", "{name:NAME}"),
            ("http_req_duration", "p(99)=<5", "one of"),
        ];
        for (metric, expression, expected) in cases {
            let error = Threshold::parse(metric, expression)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{metric} {expression}: {error}");
        }
    }
}
