//! `kbsctl plugin ...`: list plugins, enable or disable one, change one's run-time
//! settings (an external plugin's endpoint).

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
    /// Change run-time settings: `kbsctl plugin configure external/echo
    /// endpoint=http://127.0.0.1:50052 timeout_ms=2000` (a value that parses as JSON is
    /// taken as such, anything else as a string).
    Configure {
        name: String,
        /// `key=value` pairs.
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

pub async fn run(cmd: PluginCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        PluginCmd::List => list(client, output).await,
        PluginCmd::Enable { name } => set_enabled(client, output, &name, true).await,
        PluginCmd::Disable { name } => set_enabled(client, output, &name, false).await,
        PluginCmd::Configure { name, settings } => {
            configure(client, output, &name, &settings).await
        }
    }
}

/// `key=value` pairs as a JSON object (values that parse as JSON keep their type).
fn settings_object(pairs: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("`{pair}`: expected key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        map.insert(k.to_string(), value);
    }
    Ok(serde_json::Value::Object(map))
}

async fn configure(
    client: &AdminClient,
    output: Output,
    name: &str,
    pairs: &[String],
) -> anyhow::Result<()> {
    let v = client
        .configure_plugin(name, settings_object(pairs)?)
        .await?;
    print_value(output, &v, |v| {
        format!("plugin {name} settings: {}", v["settings"])
    });
    Ok(())
}

async fn list(client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let v = client.list_plugins().await?;
    if output.is_json() {
        return print_pretty(&v);
    }
    let mut t = table(&["NAME", "KIND", "KINDS", "ENABLED", "VERSION", "ENDPOINT"]);
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
            cell(&p["settings"]["endpoint"]),
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
