//! `kbsctl reference-values ...` and `kbsctl appraisal-policy ...`: what the appraisal of
//! evidence expects, and the Rego that decides.

use std::path::PathBuf;

use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, http_date, print_value, table};

#[derive(Subcommand, Debug)]
pub enum ReferenceValuesCmd {
    /// Set NAME to VALUE... (replacing its values): `mr_td`, `rtmr_0`..`rtmr_3`, `mr_seam`,
    /// `tcb_svn`, `measurement`, `snp_min_*`, `init_data`, `allow_outdated_tcb`,
    /// `allow_debug`, or a name of your own appraisal policy.
    Set {
        name: String,
        #[arg(required = true)]
        values: Vec<String>,
    },
    /// List the reference values set (and, with --known, the names the default policy reads).
    List {
        #[arg(long)]
        known: bool,
    },
    /// Remove NAME.
    Delete { name: String },
}

pub async fn run(
    cmd: ReferenceValuesCmd,
    client: &AdminClient,
    output: Output,
) -> anyhow::Result<()> {
    match cmd {
        ReferenceValuesCmd::Set { name, values } => {
            let v = client.set_reference_value(&name, &values).await?;
            print_value(output, &v, |v| format!("{name} = {}", cell(&v["values"])));
        }
        ReferenceValuesCmd::List { known } => {
            let v = client.reference_values().await?;
            if output.is_json() {
                println!("{v}");
                return Ok(());
            }
            let mut t = table(&["name", "values", "updated", "by"]);
            for r in v["reference_values"].as_array().into_iter().flatten() {
                let values: Vec<String> = r["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(cell)
                    .collect();
                t.add_row(vec![
                    cell(&r["name"]),
                    values.join("\n"),
                    http_date(&r["updated_at"]),
                    cell(&r["updated_by"]),
                ]);
            }
            println!("{t}");
            if known {
                let mut t = table(&["name", "what it checks (default appraisal policy)"]);
                for (name, what) in v["known"].as_object().into_iter().flatten() {
                    t.add_row(vec![name.clone(), cell(what)]);
                }
                println!("{t}");
            }
        }
        ReferenceValuesCmd::Delete { name } => {
            let v = client.delete_reference_value(&name).await?;
            print_value(output, &v, |_| format!("{name} deleted"));
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum AppraisalPolicyCmd {
    /// Install a Rego appraisal policy from FILE.
    Set { file: PathBuf },
    /// Print the appraisal policy in force.
    Get,
}

pub async fn run_policy(
    cmd: AppraisalPolicyCmd,
    client: &AdminClient,
    output: Output,
) -> anyhow::Result<()> {
    match cmd {
        AppraisalPolicyCmd::Set { file } => {
            let text = crate::policy::read_policy(&file)?;
            let v = client.set_appraisal_policy(&text).await?;
            print_value(output, &v, |v| {
                format!("appraisal policy installed (version {})", v["version"])
            });
        }
        AppraisalPolicyCmd::Get => {
            let (text, version) = client.get_appraisal_policy().await?;
            crate::policy::print_policy(output, &text, version);
        }
    }
    Ok(())
}
