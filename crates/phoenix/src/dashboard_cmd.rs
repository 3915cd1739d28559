//! `phoenix dashboard`: a one-time login URL for the web dashboard of the running
//! `phoenix up`, as Jupyter prints one; `--open` opens it in a browser.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::client::{ApiArgs, Client};

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Open the URL in a browser ($BROWSER, else xdg-open).
    #[arg(long)]
    pub open: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(serde::Deserialize)]
struct Login {
    url: String,
    expires_in_seconds: u64,
}

pub async fn dashboard(state: &Path, args: DashboardArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let login: Login = client
        .post_json("/v1/dashboard/login", serde_json::json!({}))
        .await?;
    println!("{}", login.url);
    eprintln!(
        "(works once, within {} s; the browser then keeps a session cookie)",
        login.expires_in_seconds
    );
    if args.open {
        let browser = std::env::var("BROWSER").unwrap_or_else(|_| "xdg-open".into());
        // The URL goes as an argument, never through a shell.
        std::process::Command::new(&browser)
            .arg(&login.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {browser} to open the dashboard"))?;
    }
    Ok(ExitCode::SUCCESS)
}
