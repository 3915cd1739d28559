//! A review fleet's copy of a fleet file: the same roles and images, its own ports, no way to
//! reach what the main fleet owns (its gossip cluster, its receivers of notifications, its
//! secrets, its bridge).

use std::net::SocketAddr;
use std::path::Path;

use toml::{Table, Value};

/// What was changed, for the operator to read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReviewCopy {
    pub text: String,
    pub changes: Vec<String>,
}

/// Rewrites fleet file `text` for a review fleet: every role's and listener's address keeps
/// its IP and takes a free port; `[agent]`, `[hooks]` and `[webhook.*]` are dropped; a fixed
/// bridge name or subnet is left to the defaults (derived from the review's own state); each
/// `[secret.NAME]` is read from `NAME` in `secrets_dir`; an image's `context` or `checks`
/// outside the copied source (`../../target/release`, a build's output) is the main fleet's,
/// from `original_dir`. A `[cluster]` is refused.
pub fn review_copy(
    text: &str,
    original_dir: &Path,
    secrets_dir: Option<&Path>,
) -> Result<ReviewCopy, String> {
    let mut table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    let mut changes = Vec::new();
    absolute_outside(&mut table, original_dir, &mut changes);
    if table.contains_key("cluster") {
        return Err(
            "a review fleet runs on this machine only: its fleet file has [cluster]".into(),
        );
    }
    for (key, what) in [
        ("agent", "[agent]: a review fleet joins no gossip cluster"),
        ("hooks", "[hooks]: a review fleet's deploys notify no one"),
        (
            "webhook",
            "[webhook.*]: a review fleet's deploys notify no one",
        ),
    ] {
        if table.remove(key).is_some() {
            changes.push(format!("dropped {what}"));
        }
    }
    if let Some(Value::Table(network)) = table.get_mut("network") {
        for key in ["bridge", "subnet"] {
            if network.remove(key).is_some() {
                changes.push(format!(
                    "[network] {key}: left to the default (the review's own)"
                ));
            }
        }
    }
    for section in ["role", "listener"] {
        let Some(Value::Table(entries)) = table.get_mut(section) else {
            continue;
        };
        for (name, entry) in entries.iter_mut() {
            let Value::Table(entry) = entry else { continue };
            for key in ["listen", "redirect_http"] {
                if let Some(Value::String(addr)) = entry.get_mut(key) {
                    let parsed: SocketAddr = addr.parse().map_err(|_| {
                        format!("[{section}.{name}] {key} = {addr:?} is not IP:PORT")
                    })?;
                    *addr = SocketAddr::new(parsed.ip(), 0).to_string();
                    changes.push(format!("[{section}.{name}] {key}: {parsed} -> a free port"));
                }
            }
        }
    }
    if let Some(Value::Table(secrets)) = table.get_mut("secret")
        && !secrets.is_empty()
    {
        let Some(dir) = secrets_dir else {
            let names: Vec<&str> = secrets.keys().map(String::as_str).collect();
            return Err(format!(
                "a review fleet does not get the main fleet's secrets: give --secrets DIR holding a file for each of {}",
                names.join(", ")
            ));
        };
        for (name, source) in secrets.iter_mut() {
            let file = dir.join(name);
            let mut own = Table::new();
            own.insert("file".into(), Value::String(file.display().to_string()));
            *source = Value::Table(own);
            changes.push(format!("[secret.{name}]: from {}", file.display()));
        }
    }
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    Ok(ReviewCopy { text, changes })
}

/// Images' `context` and `checks` that climb out of the source (`..`) are resolved against
/// the main fleet file's directory.
fn absolute_outside(table: &mut Table, original_dir: &Path, changes: &mut Vec<String>) {
    let Some(Value::Table(images)) = table.get_mut("image") else {
        return;
    };
    for (name, image) in images.iter_mut() {
        let Value::Table(image) = image else { continue };
        for key in ["context", "checks"] {
            let Some(Value::String(path)) = image.get_mut(key) else {
                continue;
            };
            let relative = Path::new(path.as_str());
            let outside = relative.is_relative()
                && relative
                    .components()
                    .any(|c| c == std::path::Component::ParentDir);
            if outside {
                let absolute = original_dir.join(relative).display().to_string();
                changes.push(format!(
                    "[image.{name}] {key}: outside the source, the main fleet's {absolute}"
                ));
                *path = absolute;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_review_copy_gets_its_own_ports_and_nothing_of_the_main_fleets_reach() {
        let text = r#"
[image.app]
from = "scratch"
context = "../../target/release"
checks = "checks.yaml"

[role.web]
image = "app"
listen = "127.0.0.1:8080"

[role.api]
image = "app"
listen = "[::1]:9090"

[listener.public]
listen = "0.0.0.0:443"
redirect_http = "0.0.0.0:80"
routes = [{ host = "a.test", role = "web" }]

[agent]
node = "a"

[hooks]
after_switch = ["./announce"]

[webhook.chat]
url = "https://chat.example.test/"

[network]
bridge = "phx-main"
subnet = "10.89.16.0/20"

[secret.db_password]
env = "DB_PASSWORD"
"#;
        let main = Path::new("/srv/app");
        let copy = review_copy(text, main, Some(Path::new("/srv/review-secrets"))).unwrap();
        let table: Table = copy.text.parse().unwrap();
        assert_eq!(
            table["image"]["app"]["context"].as_str(),
            Some("/srv/app/../../target/release")
        );
        assert_eq!(
            table["image"]["app"]["checks"].as_str(),
            Some("checks.yaml"),
            "the copy's own"
        );
        assert_eq!(table["role"]["web"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(table["role"]["api"]["listen"].as_str(), Some("[::1]:0"));
        assert_eq!(
            table["listener"]["public"]["listen"].as_str(),
            Some("0.0.0.0:0")
        );
        assert_eq!(
            table["listener"]["public"]["redirect_http"].as_str(),
            Some("0.0.0.0:0")
        );
        assert_eq!(
            table["listener"]["public"]["routes"][0]["host"].as_str(),
            Some("a.test")
        );
        for gone in ["agent", "hooks", "webhook"] {
            assert!(!table.contains_key(gone), "{gone}");
        }
        assert!(table["network"].as_table().unwrap().is_empty());
        assert_eq!(
            table["secret"]["db_password"]["file"].as_str(),
            Some("/srv/review-secrets/db_password")
        );
        assert!(table["secret"]["db_password"].get("env").is_none());
        assert_eq!(copy.changes.len(), 11, "{:?}", copy.changes);

        let error = review_copy(text, main, None).unwrap_err();
        assert!(
            error.contains("give --secrets DIR holding a file for each of db_password"),
            "{error}"
        );
        let error = review_copy(
            "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n",
            main,
            None,
        )
        .unwrap_err();
        assert!(error.contains("[cluster]"), "{error}");
    }
}
