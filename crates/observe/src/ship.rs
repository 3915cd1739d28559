//! What captured lines look like on the wire to other log systems: syslog (RFC 5424, framed
//! for TCP by octet counting, RFC 6587 §3.4.1) and Loki's JSON push API. Sending is the
//! fleet's (`phoenix_fleet`'s forwarder); this is only the encoding.

use crate::logs::{LogLine, Stream};

/// The private enterprise number RFC 5612 sets aside for examples and documentation: the
/// structured data's ID is `phoenix@32473`, so no registration is claimed.
const SD_ID: &str = "phoenix@32473";

/// Facility `daemon` (3); severity `info` (6) for stdout and `err` (3) for stderr, as
/// Docker's syslog log driver does.
fn priority(stream: Stream) -> u8 {
    match stream {
        Stream::Stdout => 3 * 8 + 6,
        Stream::Stderr => 3 * 8 + 3,
    }
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most `max` long, `-` when
/// empty.
fn header_field(text: &str, max: usize) -> String {
    let field: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if field.is_empty() { "-".into() } else { field }
}

/// A structured-data parameter value, with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn param_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One line as an RFC 5424 message: APP-NAME is the role, PROCID the instance, MSGID the
/// stream; generation, image and a split mark go in structured data; MSG is the text.
pub fn syslog_message(role: &str, hostname: &str, line: &LogLine) -> String {
    let split = if line.split { " split=\"1\"" } else { "" };
    format!(
        "<{}>1 {} {} {} {} {} [{SD_ID} generation=\"{}\" image=\"{}\"{split}] {}",
        priority(line.stream),
        phoenix_image::rfc3339_ms(line.at),
        header_field(hostname, 255),
        header_field(role, 48),
        header_field(&line.instance, 128),
        match line.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        },
        line.generation,
        param_value(&line.image),
        line.text
    )
}

/// A message framed for syslog over TCP: its length in bytes, a space, the message.
pub fn octet_frame(message: &str) -> Vec<u8> {
    let mut frame = format!("{} ", message.len()).into_bytes();
    frame.extend_from_slice(message.as_bytes());
    frame
}

/// A push request body of Loki's API (`POST /loki/api/v1/push`, JSON): one stream per
/// instance and stream, labelled `role`, `instance`, `stream`, `generation`, `image`; each
/// value a nanosecond timestamp and the text.
pub fn loki_body(role: &str, lines: &[LogLine]) -> Vec<u8> {
    use std::collections::BTreeMap;
    let mut streams: BTreeMap<(&str, &str, i64, &str), Vec<[String; 2]>> = BTreeMap::new();
    for line in lines {
        let stream = match line.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        streams
            .entry((&line.instance, stream, line.generation, &line.image))
            .or_default()
            .push([
                (i128::from(line.at) * 1_000_000).to_string(),
                line.text.clone(),
            ]);
    }
    let streams: Vec<serde_json::Value> = streams
        .into_iter()
        .map(|((instance, stream, generation, image), values)| {
            serde_json::json!({
                "stream": {
                    "role": role,
                    "instance": instance,
                    "stream": stream,
                    "generation": generation.to_string(),
                    "image": image,
                },
                "values": values,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "streams": streams })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stream: Stream, text: &str) -> LogLine {
        LogLine {
            at: 1_796_000_000_123,
            stream,
            instance: "web-3f2a".into(),
            generation: 4,
            image: "0123456789ab".into(),
            text: text.into(),
            split: false,
        }
    }

    #[test]
    fn a_line_is_an_rfc5424_message_with_role_instance_and_stream() {
        let message = syslog_message("web", "host one", &line(Stream::Stdout, "GET / 200"));
        assert_eq!(
            message,
            "<30>1 2026-11-30T00:53:20.123Z hostone web web-3f2a stdout \
             [phoenix@32473 generation=\"4\" image=\"0123456789ab\"] GET / 200"
        );
        let mut err = line(Stream::Stderr, "boom");
        err.image = "a\"b]".into();
        err.split = true;
        let message = syslog_message("", "", &err);
        assert!(message.starts_with("<27>1 "), "{message}");
        assert!(
            message.contains(" - - web-3f2a stderr [phoenix@32473 generation=\"4\" image=\"a\\\"b\\]\" split=\"1\"] boom"),
            "{message}"
        );
    }

    #[test]
    fn frames_count_bytes_not_characters() {
        assert_eq!(octet_frame("é x"), b"4 \xc3\xa9 x".to_vec());
    }

    #[test]
    fn loki_bodies_group_lines_into_labelled_streams() {
        let lines = [
            line(Stream::Stdout, "one"),
            line(Stream::Stderr, "two"),
            line(Stream::Stdout, "three"),
        ];
        let body: serde_json::Value = serde_json::from_slice(&loki_body("web", &lines)).unwrap();
        let streams = body["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0]["stream"]["stream"], "stderr");
        assert_eq!(streams[1]["stream"]["role"], "web");
        assert_eq!(streams[1]["stream"]["generation"], "4");
        assert_eq!(
            streams[1]["values"],
            serde_json::json!([
                ["1796000000123000000", "one"],
                ["1796000000123000000", "three"]
            ])
        );
    }
}
