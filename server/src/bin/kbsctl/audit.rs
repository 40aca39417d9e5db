//! `kbsctl audit`: the audit log of admin actions, newest first.

use reqwest::Method;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, http_date, print_pretty, table};
use crate::query::urlencode;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Only this action (`resource.*` for a prefix).
    #[arg(long)]
    action: Option<String>,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub async fn run(args: AuditArgs, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let mut q = format!("/kbs/v0/admin/audit?limit={}", args.limit);
    if let Some(a) = &args.action {
        q.push_str(&format!("&action={}", urlencode(a)));
    }
    let v = client.send(Method::GET, &q, None).await?;
    if output.is_json() {
        return print_pretty(&v);
    }
    let mut t = table(&[
        "ID", "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "OUTCOME", "DETAIL",
    ]);
    for r in v["records"].as_array().into_iter().flatten() {
        t.add_row(vec![
            r["id"].to_string(),
            http_date(&r["at"]),
            cell(&r["actor"]),
            cell(&r["role"]),
            cell(&r["action"]),
            cell(&r["target"]),
            cell(&r["outcome"]),
            cell(&r["detail"]),
        ]);
    }
    println!("{t}");
    Ok(())
}
