//! `kbsctl guests ...`: the fleet view (every known guest), and ping or probe one guest.

use clap::Subcommand;
use reqwest::Method;
use rpc_defs::ProbeKind;
use serde_json::Value;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, http_date, print_pretty, print_value, table};
use crate::query::urlencode;

#[derive(Subcommand, Debug)]
pub enum GuestsCmd {
    /// List guests: every known one by default, filtered by selector, drift and connection.
    List(ListArgs),
    /// Echo 256 bytes through a guest's tunnel and print the round-trip time.
    Ping { guest_id: String },
    /// Ask a guest for health, held resources and runtime figures (pretty JSON).
    Probe {
        guest_id: String,
        /// What to probe: health, resources, runtime or all.
        #[arg(long, default_value = "all")]
        kind: ProbeKind,
    },
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Label selector, e.g. `app=db,zone in (eu-1,eu-2)`.
    #[arg(long)]
    selector: Option<String>,
    /// Only guests holding an older version of this resource than the latest (drift).
    #[arg(long)]
    stale: Option<String>,
    /// Only guests with a live tunnel.
    #[arg(long, conflicts_with = "disconnected")]
    connected: bool,
    /// Only known guests without a live tunnel.
    #[arg(long)]
    disconnected: bool,
    /// Page size (every page is fetched unless --no-follow).
    #[arg(long, default_value_t = 500)]
    limit: usize,
    /// Only the first page.
    #[arg(long)]
    no_follow: bool,
}

pub async fn run(cmd: GuestsCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        GuestsCmd::List(args) => list(args, client, output).await?,
        GuestsCmd::Ping { guest_id } => {
            let rtt = client.ping_guest(&guest_id).await?;
            let v = serde_json::json!({"guest_id": guest_id, "rtt_us": rtt});
            print_value(output, &v, |_| format!("pong from {guest_id}: {rtt} us"));
        }
        // A probe report has no table form: always pretty JSON.
        GuestsCmd::Probe { guest_id, kind } => {
            print_pretty(&client.probe_guest(&guest_id, kind).await?)?;
        }
    }
    Ok(())
}

impl ListArgs {
    /// The fleet view's first page; later pages add `&cursor=`.
    fn query(&self) -> String {
        let connected = if self.connected {
            "true"
        } else if self.disconnected {
            "false"
        } else {
            "any"
        };
        let mut q = format!(
            "/kbs/v0/admin/guests?limit={}&connected={connected}",
            self.limit
        );
        if let Some(sel) = &self.selector {
            q.push_str(&format!("&selector={}", urlencode(sel)));
        }
        if let Some(path) = &self.stale {
            q.push_str(&format!("&stale={}", urlencode(path)));
        }
        q
    }
}

async fn list(args: ListArgs, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let (guests, forget_after) = fetch_pages(client, &args.query(), args.no_follow).await?;
    if output.is_json() {
        return print_pretty(&serde_json::json!({"guests": guests, "forget_after": forget_after}));
    }
    let mut t = table(&[
        "GUEST",
        "STATE",
        "LABELS",
        "TEE",
        "VERSION",
        "HELD",
        "LAST PROBE",
        "LAST SEEN",
    ]);
    for g in &guests {
        t.add_row(row(g));
    }
    println!("{t}");
    println!("{}", footer(guests.len(), &forget_after));
    Ok(())
}

/// The line under the table: how many, and how long the KBS keeps guests that are gone.
fn footer(count: usize, forget_after: &str) -> String {
    if forget_after.is_empty() {
        format!("{count} guest(s)")
    } else {
        format!(
            "{count} guest(s); a guest without a tunnel is forgotten {forget_after} after it was last seen"
        )
    }
}

/// The guests of every page from `first` on, or of the first page alone with `first_only`,
/// and how long the KBS keeps guests that are gone (`forget_after`).
async fn fetch_pages(
    client: &AdminClient,
    first: &str,
    first_only: bool,
) -> anyhow::Result<(Vec<Value>, String)> {
    let mut guests: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{first}&cursor={}", urlencode(c)),
            None => first.to_owned(),
        };
        let v = client.send(Method::GET, &url, None).await?;
        guests.extend(v["guests"].as_array().cloned().unwrap_or_default());
        cursor = v["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() || first_only {
            return Ok((guests, cell(&v["forget_after"])));
        }
    }
}

/// One guest of the fleet view as a table row.
fn row(g: &Value) -> Vec<String> {
    let labels: Vec<String> = g["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", cell(v)))
        .collect();
    let held: Vec<String> = g["held"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}@{}", v["version"]))
        .collect();
    let state = if g["connected"].as_bool() == Some(true) {
        "connected".to_string()
    } else {
        // The newest connection's reason is why the guest is gone now.
        let reason = cell(&g["history"][0]["reason"]);
        if reason.is_empty() {
            "disconnected".to_string()
        } else {
            format!("disconnected ({reason})")
        }
    };
    let probe = if g["last_probe"].is_null() {
        String::new()
    } else {
        format!(
            "{} {}",
            cell(&g["last_probe"]["outcome"]),
            http_date(&g["last_probe"]["at"])
        )
    };
    vec![
        cell(&g["guest_id"]),
        state,
        labels.join(","),
        cell(&g["tee"]),
        cell(&g["daemon_version"]),
        held.join(" "),
        probe,
        http_date(&g["last_seen"]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_disconnected_guest_shows_why_it_left() {
        let g = json!({
            "guest_id": "g1", "connected": false, "labels": {"app": "db"},
            "held": {"default/key/tls": {"version": 3}},
            "history": [{"reason": "server silent"}], "last_probe": null,
        });
        let r = row(&g);
        assert_eq!(r[0], "g1");
        assert_eq!(r[1], "disconnected (server silent)");
        assert_eq!(r[2], "app=db");
        assert_eq!(r[5], "default/key/tls@3");
        assert_eq!(r[6], "");
    }

    #[test]
    fn the_footer_says_how_long_gone_guests_are_kept() {
        assert_eq!(
            footer(3, "30days"),
            "3 guest(s); a guest without a tunnel is forgotten 30days after it was last seen"
        );
        assert_eq!(footer(1, ""), "1 guest(s)", "an older KBS does not say");
    }
}
