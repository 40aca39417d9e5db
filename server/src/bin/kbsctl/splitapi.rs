//! `kbsctl splitapi ...`: the workload owner's client credentials for a sandbox.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, print_value};

#[derive(Subcommand, Debug)]
pub enum SplitapiCmd {
    /// Fetch the owner's client bundle of a sandbox and write ca.crt, client.crt, client.key
    /// (the key 0600) into DIR.
    ClientCreds {
        guest_id: String,
        /// Directory to write the three files into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(cmd: SplitapiCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let SplitapiCmd::ClientCreds { guest_id, out } = cmd;
    let bundle = client.splitapi_client_creds(&guest_id).await?;
    bundle
        .write_to(&out)
        .with_context(|| format!("writing the client bundle into {}", out.display()))?;
    let v = serde_json::json!({
        "guest_id": bundle.guest_id,
        "version": bundle.version,
        "not_after": bundle.not_after,
        "dir": out.display().to_string(),
        "files": ["ca.crt", "client.crt", "client.key"],
    });
    print_value(output, &v, |_| {
        format!(
            "wrote ca.crt, client.crt, client.key (0600) for {guest_id} (version {}) into {}",
            bundle.version,
            out.display()
        )
    });
    Ok(())
}
