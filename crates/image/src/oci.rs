//! OCI image config and manifest documents, serialized canonically.
//!
//! Field order in these structs is alphabetical and maps are `BTreeMap`s, so that
//! `serde_json::to_vec` writes sorted keys with no whitespace: the same image always
//! hashes to the same digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor: what a digest points to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Set on the entries of an index that lists images for several platforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    pub size: u64,
}

impl Descriptor {
    pub fn new(digest: String, media_type: &str, size: u64) -> Descriptor {
        Descriptor {
            digest,
            media_type: media_type.into(),
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// The image manifest; its digest is the image's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
}

/// The image configuration document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDocument {
    pub architecture: String,
    #[serde(default)]
    pub config: ImageConfig,
    #[serde(default)]
    pub created: String,
    pub os: String,
    pub rootfs: RootFs,
}

/// How an instance of the image runs (the OCI config's `config` object; fields in
/// alphabetical order of their JSON names). `null`s written by other tools read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(
        rename = "Cmd",
        default,
        deserialize_with = "or_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cmd: Vec<String>,
    #[serde(rename = "Entrypoint", default, deserialize_with = "or_empty")]
    pub entrypoint: Vec<String>,
    /// `KEY=VALUE` pairs: the base's in its order, then the recipe's new keys sorted.
    #[serde(
        rename = "Env",
        default,
        deserialize_with = "or_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    /// `"8080/tcp": {}` for each exposed port.
    #[serde(
        rename = "ExposedPorts",
        default,
        deserialize_with = "or_empty",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "or_empty",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        rename = "User",
        default,
        deserialize_with = "or_empty",
        skip_serializing_if = "String::is_empty"
    )]
    pub user: String,
    #[serde(rename = "WorkingDir", default, deserialize_with = "or_empty")]
    pub working_dir: String,
}

/// The `{}` value of a set written as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

fn or_empty<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

/// The layout's `index.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
}

/// The OCI name of this machine's architecture.
pub fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// RFC 3339 UTC time of a Unix timestamp, without a date library.
pub fn rfc3339(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// RFC 3339 UTC time, to the millisecond, of a Unix time in milliseconds: how every `*_at`
/// of Phoenix's JSON reads (`2026-12-02T14:48:22.123Z`).
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let seconds = rfc3339(unix_ms.div_euclid(1000).max(0) as u64);
    format!("{}.{:03}Z", &seconds[..19], unix_ms.rem_euclid(1000))
}

/// The Unix time in milliseconds of an RFC 3339 UTC timestamp (fractions past milliseconds
/// are dropped).
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let seconds = i64::try_from(parse_rfc3339(text)?).ok()?;
    let millis = match text.get(19..20) {
        Some(".") => {
            let digits: String = text[20..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            format!("{digits:0<3}")[..3].parse::<i64>().ok()?
        }
        _ => 0,
    };
    Some(seconds * 1000 + millis)
}

/// Serde for a Unix time in milliseconds written as RFC 3339 (`#[serde(with = ...)]`); reading
/// also takes the number itself.
pub mod wire_time {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(&super::rfc3339_ms(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Millis(i64),
            Text(String),
        }
        match Written::deserialize(input)? {
            Written::Millis(ms) => Ok(ms),
            Written::Text(text) => super::parse_rfc3339_ms(&text).ok_or_else(|| {
                serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time"))
            }),
        }
    }

    /// The same for an optional time.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(ms: &Option<i64>, out: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => super::serialize(ms, out),
                None => out.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Option<i64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] i64);
            Ok(Option::<Wrapped>::deserialize(input)?.map(|w| w.0))
        }
    }
}

/// The Unix time of an RFC 3339 UTC timestamp (`YYYY-MM-DDTHH:MM:SS` then anything).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of `rfc3339`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_what_it_formats() {
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123456Z"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn milliseconds_go_there_and_back() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(5), "1970-01-01T00:00:00.005Z");
        for ms in [0, 5, 1_700_000_000_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20Z"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500)
        );
        assert_eq!(parse_rfc3339_ms("nonsense"), None);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
