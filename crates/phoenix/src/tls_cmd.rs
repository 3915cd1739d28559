//! `phoenix tls dev-cert`: a self-signed certificate and key for trying a TLS listener
//! (`[listener.NAME] tls`) on a development machine, made with rcgen. Not for production:
//! nobody trusts it but those told to (`curl --cacert cert.pem`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TlsCommand {
    /// Write a self-signed development certificate (cert.pem) and its key (key.pem, 0600).
    DevCert(DevCertArgs),
}

#[derive(Debug, clap::Args)]
pub struct DevCertArgs {
    /// A name the certificate is for (`localhost`, `api.example.test`, `*.example.test`);
    /// repeat for more. Default: localhost.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// The directory to write cert.pem and key.pem in (existing files are not overwritten).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

pub fn run(args: TlsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TlsCommand::DevCert(args) => dev_cert(args),
    }
}

fn dev_cert(args: DevCertArgs) -> anyhow::Result<ExitCode> {
    let names = if args.names.is_empty() {
        vec!["localhost".to_string()]
    } else {
        args.names
    };
    for name in &names {
        if name.parse::<std::net::IpAddr>().is_err() {
            phoenix_proxy::edge::HostMatch::parse(Some(name))
                .map_err(|why| anyhow::anyhow!("--name {why}"))?;
        }
    }
    let made =
        rcgen::generate_simple_self_signed(names.clone()).context("cannot make the certificate")?;
    let cert_path = args.out.join("cert.pem");
    let key_path = args.out.join("key.pem");
    write_new(&cert_path, made.cert.pem().as_bytes(), 0o644)?;
    write_new(&key_path, made.key_pair.serialize_pem().as_bytes(), 0o600)?;
    println!(
        "wrote {} and {} (self-signed, for {}): use them as [listener.NAME] tls = {{ cert = \"{}\", key = \"{}\" }}",
        cert_path.display(),
        key_path.display(),
        names.join(", "),
        cert_path.display(),
        key_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` with `mode`; an existing file is an error, not overwritten.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
