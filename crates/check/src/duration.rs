//! Go's duration syntax, as goss and Serf files write durations.

use std::time::Duration;

/// Go's `time.ParseDuration`: decimal numbers with units, like `"1h30m"`, `"1.5s"` or
/// `"300ms"` (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); a negative duration is refused.
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration {text:?}");
    let rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() || rest.starts_with('-') {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = rest;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    // Go's durations stop at about 292 years.
    Duration::try_from_secs_f64(total)
        .ok()
        .filter(|d| d.as_secs() < 9_223_372_036)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_gos() {
        for (text, millis) in [
            ("0", 0),
            ("300ms", 300),
            ("1.5s", 1500),
            ("1h30m", 5_400_000),
            ("2m3s", 123_000),
            ("1500us", 1),
        ] {
            assert_eq!(go_duration(text).unwrap().as_millis(), millis, "{text}");
        }
        for text in ["", "5", "-1s", "1x", "s", "1.2.3s"] {
            assert!(go_duration(text).is_err(), "{text}");
        }
    }
}
