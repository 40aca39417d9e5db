//! `kbsctl provisioner ...`: per-VM disk keys (the `provisioner` plugin): provision a VM,
//! list the provisioned ones, erase one's key.

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, print_pretty, print_value, table};

#[derive(Subcommand, Debug)]
pub enum ProvisionerCmd {
    /// Provision a VM's disk key (or find the one already provisioned) and print its UUID,
    /// resource path, OEM string and MRCONFIGID.
    Provision {
        /// The VM's name.
        vm_name: String,
        /// The VM's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Also write the decoded initdata.toml (what the VM attests with) to this file.
        #[arg(long, value_name = "FILE")]
        initdata_out: Option<PathBuf>,
    },
    /// List the provisioned VMs (never their keys).
    List,
    /// Erase a VM's disk key.
    Delete {
        /// The VM's UUID, as `provision` printed it.
        uuid: String,
    },
}

pub async fn run(cmd: ProvisionerCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        ProvisionerCmd::Provision {
            vm_name,
            namespace,
            initdata_out,
        } => {
            let v = client.provision(&vm_name, &namespace).await?;
            if let Some(path) = initdata_out {
                let initdata = v["oemstring"]
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .context("the KBS answered no valid oemstring")?;
                std::fs::write(&path, initdata)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            print_value(output, &v, |v| {
                format!(
                    "uuid          {}\nresource_path {}\noemstring     {}\nmrconfigid    {}\nhostdata      {}",
                    cell(&v["uuid"]),
                    cell(&v["resource_path"]),
                    cell(&v["oemstring"]),
                    cell(&v["mrconfigid"]),
                    cell(&v["hostdata"]),
                )
            });
            Ok(())
        }
        ProvisionerCmd::List => {
            let v = client.list_provisioned().await?;
            if output.is_json() {
                return print_pretty(&v);
            }
            let mut t = table(&["UUID", "NAMESPACE", "VM", "CREATED", "BY"]);
            for r in v["provisioned"].as_array().into_iter().flatten() {
                t.add_row(vec![
                    cell(&r["uuid"]),
                    cell(&r["namespace"]),
                    cell(&r["vm_name"]),
                    cell(&r["created_at"]),
                    cell(&r["created_by"]),
                ]);
            }
            println!("{t}");
            if v["truncated"].as_bool() == Some(true) {
                println!("(more VMs are provisioned than one listing shows)");
            }
            Ok(())
        }
        ProvisionerCmd::Delete { uuid } => {
            let v = client.deprovision(&uuid).await?;
            print_value(output, &v, |_| {
                format!("deleted: the disk key of {uuid} is erased")
            });
            Ok(())
        }
    }
}
