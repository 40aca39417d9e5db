//! `kbsctl policy ...`: install and print the resource policy.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, print_value};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Install a Rego resource policy from FILE.
    Set { file: PathBuf },
    /// Print the current resource policy.
    Get,
}

pub async fn run(cmd: PolicyCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Set { file } => {
            let v = client.set_policy(&read_policy(&file)?).await?;
            print_value(output, &v, |v| {
                format!("policy installed (version {})", v["version"])
            });
        }
        PolicyCmd::Get => {
            let (text, version) = client.get_policy().await?;
            print_policy(output, &text, version);
        }
    }
    Ok(())
}

/// A Rego file's text, for `policy set` and `appraisal-policy set`.
pub fn read_policy(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// A policy's text as it is (or with its version, as JSON), for `policy get` and
/// `appraisal-policy get`.
pub fn print_policy(output: Output, text: &str, version: u64) {
    if output.is_json() {
        println!(
            "{}",
            serde_json::json!({"version": version, "policy": text})
        );
    } else {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
}
