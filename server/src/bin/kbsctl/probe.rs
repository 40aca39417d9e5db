//! `kbsctl probe`: probe guests through their tunnels, one by id or many by label selector.

use reqwest::Method;
use rpc_defs::ProbeKind;
use serde_json::Value;
use server::admin_client::{AdminClient, RequestBody};

use crate::output::{Output, cell, print_pretty, table};
use crate::query::urlencode;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["guest_id", "selector"])))]
pub struct ProbeArgs {
    /// The guest to probe.
    guest_id: Option<String>,
    /// Probe every guest matching this label selector (`""` for all).
    #[arg(long)]
    selector: Option<String>,
    /// What to probe: health, resources, runtime or all.
    #[arg(long, default_value = "all")]
    kind: ProbeKind,
    /// Guests probed at once (selector form).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Deadline of the whole selector probe, ms.
    #[arg(long, default_value_t = 10_000)]
    deadline_ms: u64,
}

impl ProbeArgs {
    /// The probes API path and body: one guest by id, else the selector form. The API spells
    /// kinds in lower case (`ProbeKind::as_str`), not as serde's variant names.
    fn request(&self) -> (String, Value) {
        match &self.guest_id {
            Some(id) => (
                format!("/kbs/v0/probes/{}", urlencode(id)),
                serde_json::json!({"kind": self.kind.as_str()}),
            ),
            None => (
                "/kbs/v0/probes".to_owned(),
                serde_json::json!({
                    "selector": self.selector.clone().unwrap_or_default(),
                    "kind": self.kind.as_str(),
                    "concurrency": self.concurrency,
                    "deadline_ms": self.deadline_ms,
                }),
            ),
        }
    }
}

pub async fn run(args: ProbeArgs, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let (path, body) = args.request();
    let v = client
        .send(Method::POST, &path, Some(RequestBody::Json(body)))
        .await?;
    if output.is_json() {
        return print_pretty(&v);
    }
    // One guest answers with its result alone; a selector probe with `results` and a summary.
    let results: Vec<Value> = match v["results"].as_array() {
        Some(r) => r.clone(),
        None => vec![v.clone()],
    };
    let mut t = table(&["GUEST", "OUTCOME", "RTT", "HEALTHY", "HELD", "DETAIL"]);
    for r in &results {
        let held: Vec<String> = r["report"]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| format!("{}@{}", cell(&h["uri"]), h["version"]))
            .collect();
        t.add_row(vec![
            cell(&r["guest_id"]),
            cell(&r["outcome"]),
            format!("{:.1} ms", r["rtt_us"].as_f64().unwrap_or(0.0) / 1000.0),
            cell(&r["report"]["health"]["healthy"]),
            held.join(" "),
            cell(&r["error"]),
        ]);
    }
    println!("{t}");
    if let Some(summary) = v["summary"].as_object() {
        let parts: Vec<String> = summary.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!(
            "{} selected in {} ms; {}",
            v["selected"],
            v["elapsed_ms"],
            parts.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(guest_id: Option<&str>, selector: Option<&str>, kind: ProbeKind) -> ProbeArgs {
        ProbeArgs {
            guest_id: guest_id.map(str::to_owned),
            selector: selector.map(str::to_owned),
            kind,
            concurrency: 8,
            deadline_ms: 500,
        }
    }

    #[test]
    fn one_guest_is_probed_by_path_with_the_kind_in_lower_case() {
        let (path, body) = args(Some("g/1"), None, ProbeKind::Resources).request();
        assert_eq!(path, "/kbs/v0/probes/g%2F1");
        assert_eq!(body, serde_json::json!({"kind": "resources"}));
    }

    #[test]
    fn a_selector_probe_carries_its_limits() {
        let (path, body) = args(None, Some("zone=eu-1"), ProbeKind::Health).request();
        assert_eq!(path, "/kbs/v0/probes");
        assert_eq!(
            body,
            serde_json::json!({
                "selector": "zone=eu-1", "kind": "health", "concurrency": 8, "deadline_ms": 500,
            })
        );
    }
}
