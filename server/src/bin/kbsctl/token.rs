//! `kbsctl token`: an admin token (JWT) for the dashboard's login, signed locally.

use std::time::Duration;

use kbs_core::admin_key::{AdminKeyPair, AdminTokenRequest};

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Validity; the dashboard session never outlives it (and lasts at most 15 minutes).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// Prints a token for `subject` in `role`; no request reaches the KBS.
pub fn run(args: TokenArgs, key: &AdminKeyPair, subject: &str, role: &str) -> anyhow::Result<()> {
    let token = key.sign(&AdminTokenRequest::new(subject, role, args.ttl))?;
    println!("{token}");
    Ok(())
}
