//! `kbsctl resource ...`: upload versions of a resource, list them, delete.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, http_date, print_pretty, print_value, table};

#[derive(Subcommand, Debug)]
pub enum ResourceCmd {
    /// Upload FILE (or `-` for stdin) as a new version of <repo>/<type>/<tag>.
    Put { path: String, file: PathBuf },
    /// List the versions of <repo>/<type>/<tag>.
    Versions { path: String },
    /// Delete <repo>/<type>/<tag> (its plaintext is erased).
    Delete { path: String },
}

pub async fn run(cmd: ResourceCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        ResourceCmd::Put { path, file } => {
            let data = read_input(&file)?;
            let v = client.put_resource(&path, data).await?;
            print_value(output, &v, |v| {
                format!(
                    "stored {} version {} (sha256 {})",
                    cell(&v["path"]),
                    v["version"],
                    cell(&v["sha256"])
                )
            });
        }
        ResourceCmd::Versions { path } => {
            let v = client.resource_versions(&path).await?;
            if output.is_json() {
                return print_pretty(&v);
            }
            let mut t = table(&["VERSION", "SHA256", "SIZE", "CREATED", "BY", "STATE"]);
            for r in v["versions"].as_array().into_iter().flatten() {
                t.add_row(vec![
                    r["version"].to_string(),
                    cell(&r["sha256"]).chars().take(16).collect::<String>(),
                    r["size"].to_string(),
                    http_date(&r["created_at"]),
                    cell(&r["created_by"]),
                    if r["deleted"].as_bool() == Some(true) {
                        "deleted".into()
                    } else {
                        "live".into()
                    },
                ]);
            }
            println!("{t}");
        }
        ResourceCmd::Delete { path } => {
            let v = client.delete_resource(&path).await?;
            print_value(output, &v, |_| format!("deleted {path}"));
        }
    }
    Ok(())
}

/// The file's bytes, or stdin's for `-`.
fn read_input(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        return Ok(buf);
    }
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}
