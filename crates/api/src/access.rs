//! Who may call the API, and what they may do.
//!
//! The Unix socket admits its owner (and root), checked by peer credentials. TCP admits a
//! bearer token or a client certificate; a token is read-only or operator. Tokens come from a
//! file or the environment, never from the command line.

use std::fmt;
use std::path::{Path, PathBuf};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// GET only: status, history, images, metrics.
    Read,
    /// Everything, deploys and scales included.
    Operate,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "operate" => Some(Scope::Operate),
            _ => None,
        }
    }
}

/// Who is on the other end of a connection, as far as the connection itself tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A local process on the Unix socket, by its uid.
    Local { uid: u32 },
    /// A TCP client that showed a client certificate the CA signed (by its SHA-256).
    Certificate { fingerprint: String },
    /// A TCP client without a certificate: it must show a token.
    Remote,
}

/// An authenticated caller, as the journal names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Uid(u32),
    Token(String),
    Certificate(String),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Uid(uid) => write!(f, "uid {uid}"),
            Caller::Token(name) => write!(f, "token {name}"),
            Caller::Certificate(fingerprint) => write!(f, "certificate sha256:{fingerprint}"),
        }
    }
}

/// A named bearer token.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    pub scope: Scope,
    secret: Vec<u8>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, whatever prints this.
        write!(f, "Token({} {:?})", self.name, self.scope)
    }
}

/// Why a token file or variable was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {cause}")]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("the token file {path} can be read by other users (mode {mode:o}): chmod 600 {path}")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("PHOENIX_API_TOKEN is set but empty: an empty token is refused")]
    EmptyVariable,
}

/// Tokens need this much to resist guessing over the network.
const MIN_SECRET: usize = 16;

impl Token {
    /// The token of `PHOENIX_API_TOKEN`: named `env`, operator scope.
    pub fn from_env_value(value: &str) -> Result<Token, TokenError> {
        if value.trim().is_empty() {
            return Err(TokenError::EmptyVariable);
        }
        Ok(Token {
            name: "env".into(),
            scope: Scope::Operate,
            secret: value.trim().as_bytes().to_vec(),
        })
    }

    /// Reads a token file: one token a line, `NAME SCOPE SECRET` (SCOPE is `read` or
    /// `operate`); `#` starts a comment. The file must be its owner's alone, as ssh keys are.
    pub fn load_file(path: &Path) -> Result<Vec<Token>, TokenError> {
        use std::os::unix::fs::MetadataExt;
        let read = |cause| TokenError::Read {
            path: path.to_path_buf(),
            cause,
        };
        let metadata = std::fs::metadata(path).map_err(read)?;
        if metadata.mode() & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_path_buf(),
                mode: metadata.mode() & 0o7777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Token::parse_file(path, &text)
    }

    fn parse_file(path: &Path, text: &str) -> Result<Vec<Token>, TokenError> {
        let mut tokens: Vec<Token> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let invalid = |message: String| TokenError::Invalid {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, scope, secret] = fields[..] else {
                return Err(invalid(format!(
                    "write `NAME SCOPE SECRET` (SCOPE is read or operate), not {} field(s)",
                    fields.len()
                )));
            };
            let plain = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !plain || name.len() > 64 {
                return Err(invalid(format!(
                    "token name {name:?} may only hold letters, digits, `-` and `_` (64 at most)"
                )));
            }
            let scope = Scope::parse(scope).ok_or_else(|| {
                invalid(format!(
                    "token {name}: scope {scope:?} is neither `read` nor `operate`"
                ))
            })?;
            if secret.len() < MIN_SECRET {
                return Err(invalid(format!(
                    "token {name}: the secret is shorter than {MIN_SECRET} characters"
                )));
            }
            if tokens.iter().any(|t| t.name == name) {
                return Err(invalid(format!("token {name} is defined twice")));
            }
            tokens.push(Token {
                name: name.to_string(),
                scope,
                secret: secret.as_bytes().to_vec(),
            });
        }
        if tokens.is_empty() {
            return Err(TokenError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                message: "no token in the file".into(),
            });
        }
        Ok(tokens)
    }
}

/// The token that matches `given`; every token is compared, in constant time, so neither the
/// time taken nor which token matched leaks how much of a guess was right.
pub fn find_token<'a>(tokens: &'a [Token], given: &[u8]) -> Option<&'a Token> {
    let mut found = None;
    for token in tokens {
        if constant_time_eq(&token.secret, given) {
            found = Some(token);
        }
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The Host values a TCP listener answers to: its own address, `localhost` and loopback
/// addresses at its port, and the names the operator adds. Anything else is DNS rebinding or a
/// misdirected request.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    port: u16,
    names: Vec<String>,
}

impl HostPolicy {
    pub fn new(listen: std::net::SocketAddr, extra: &[String]) -> HostPolicy {
        let mut names = vec![
            listen.ip().to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
            "[::1]".into(),
        ];
        if listen.is_ipv6() {
            names.push(format!("[{}]", listen.ip()));
        }
        names.extend(extra.iter().map(|n| n.to_ascii_lowercase()));
        HostPolicy {
            port: listen.port(),
            names,
        }
    }

    /// Whether `host` (a Host header's value) names this listener.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(':') && !port.contains(']') => {
                (name.to_string(), port.parse::<u16>().ok())
            }
            _ => (host.clone(), None),
        };
        port.is_none_or(|p| p == self.port) && self.names.contains(&name)
    }

    /// Whether `origin` (an Origin header's value) is this listener itself: browsers send
    /// Origin on cross-site requests, and no other site may drive the API.
    pub fn allows_origin(&self, origin: &str) -> bool {
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        rest.is_some_and(|host| !host.contains('/') && self.allows(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Vec<Token>, TokenError> {
        Token::parse_file(Path::new("tokens"), text)
    }

    #[test]
    fn token_files_name_the_line_of_each_mistake() {
        let tokens =
            file("# ops\nci read 0123456789abcdef\nops operate fedcba9876543210 # x\n").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            (tokens[0].name.as_str(), tokens[0].scope),
            ("ci", Scope::Read)
        );
        assert_eq!(tokens[1].scope, Scope::Operate);
        let cases = [
            ("ci read\n", "tokens:1: write `NAME SCOPE SECRET`"),
            (
                "\nci admin 0123456789abcdef\n",
                "tokens:2: token ci: scope \"admin\"",
            ),
            (
                "ci read short\n",
                "tokens:1: token ci: the secret is shorter than 16",
            ),
            (
                "c/i read 0123456789abcdef\n",
                "tokens:1: token name \"c/i\"",
            ),
            (
                "a read 0123456789abcdef\na read 0123456789abcdef0\n",
                "tokens:2: token a is defined twice",
            ),
            ("# nothing\n\n", "tokens:1: no token in the file"),
        ];
        for (text, expected) in cases {
            let message = file(text).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{text:?}: {message}");
        }
        assert!(format!("{:?}", tokens[0]).contains("ci"));
        assert!(!format!("{:?}", tokens[0]).contains("0123456789abcdef"));
    }

    #[test]
    fn empty_tokens_are_refused() {
        assert!(matches!(
            Token::from_env_value("  "),
            Err(TokenError::EmptyVariable)
        ));
        assert!(file("ci read \n").is_err());
    }

    #[test]
    fn the_matching_token_is_found_among_several() {
        let tokens = file("a read 0123456789abcdef\nb operate 0123456789abcdeg\n").unwrap();
        assert_eq!(
            find_token(&tokens, b"0123456789abcdeg").map(|t| t.name.as_str()),
            Some("b")
        );
        assert!(find_token(&tokens, b"0123456789abcde").is_none());
        assert!(find_token(&tokens, b"").is_none());
    }

    #[test]
    fn hosts_and_origins_must_name_the_listener() {
        let policy = HostPolicy::new("127.0.0.1:7070".parse().unwrap(), &["ops.example".into()]);
        for good in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST",
            "ops.example:7070",
        ] {
            assert!(policy.allows(good), "{good}");
        }
        for bad in [
            "attacker.example",
            "127.0.0.1:7071",
            "attacker.example:7070",
            "",
        ] {
            assert!(!policy.allows(bad), "{bad}");
        }
        assert!(policy.allows_origin("http://localhost:7070"));
        for bad in [
            "http://attacker.example",
            "null",
            "http://localhost:7070/x",
            "file://",
        ] {
            assert!(!policy.allows_origin(bad), "{bad}");
        }
        let v6 = HostPolicy::new("[::1]:7070".parse().unwrap(), &[]);
        assert!(v6.allows("[::1]:7070"));
        assert!(!v6.allows("[::2]:7070"));
    }
}
