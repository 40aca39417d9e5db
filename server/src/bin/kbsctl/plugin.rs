//! `kbsctl plugin ...`: list plugins, enable or disable one.

use clap::Subcommand;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, print_pretty, print_value, table};

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// List plugins with their kind, state and version.
    List,
    /// Enable a plugin.
    Enable { name: String },
    /// Disable a plugin: its routes answer 404, it gets no events, its tasks stop.
    Disable { name: String },
}

pub async fn run(cmd: PluginCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        PluginCmd::List => list(client, output).await,
        PluginCmd::Enable { name } => set_enabled(client, output, &name, true).await,
        PluginCmd::Disable { name } => set_enabled(client, output, &name, false).await,
    }
}

async fn list(client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let v = client.list_plugins().await?;
    if output.is_json() {
        return print_pretty(&v);
    }
    let mut t = table(&["NAME", "KIND", "KINDS", "ENABLED", "VERSION"]);
    for p in v["plugins"].as_array().into_iter().flatten() {
        let kinds: Vec<String> = p["kinds"]
            .as_array()
            .into_iter()
            .flatten()
            .map(cell)
            .collect();
        t.add_row(vec![
            cell(&p["name"]),
            cell(&p["kind"]),
            kinds.join(","),
            cell(&p["enabled"]),
            cell(&p["version"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

async fn set_enabled(
    client: &AdminClient,
    output: Output,
    name: &str,
    enabled: bool,
) -> anyhow::Result<()> {
    let v = client.set_plugin_enabled(name, enabled).await?;
    print_value(output, &v, |v| {
        let state = if enabled { "enabled" } else { "disabled" };
        let how = if v["changed"].as_bool() == Some(true) {
            ""
        } else {
            " (already)"
        };
        format!("plugin {name} {state}{how}")
    });
    Ok(())
}
