//! `kbsctl events`: the event log (connects, disconnects, admin actions, policy, rollouts).

use reqwest::Method;
use server::admin_client::AdminClient;

use crate::output::{Output, cell, http_date, print_pretty, table};
use crate::query::urlencode;

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Only these kinds (comma-separated: connect,disconnect,admin,policy,rollout,probe).
    #[arg(long)]
    kind: Option<String>,
    /// Only this guest.
    #[arg(long)]
    guest: Option<String>,
    /// Only this actor (`subject@key`).
    #[arg(long)]
    actor: Option<String>,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Older than this event id (the previous page's `next_before`).
    #[arg(long)]
    before: Option<i64>,
}

impl EventsArgs {
    fn query(&self) -> String {
        let mut q = format!("/kbs/v0/admin/events?limit={}", self.limit);
        for (k, v) in [
            ("kind", &self.kind),
            ("guest_id", &self.guest),
            ("actor", &self.actor),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", urlencode(v)));
            }
        }
        if let Some(b) = self.before {
            q.push_str(&format!("&before={b}"));
        }
        q
    }
}

pub async fn run(args: EventsArgs, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let v = client.send(Method::GET, &args.query(), None).await?;
    if output.is_json() {
        return print_pretty(&v);
    }
    let mut t = table(&[
        "ID", "AT", "KIND", "ACTION", "GUEST", "ACTOR", "TARGET", "OUTCOME", "DETAIL",
    ]);
    for r in v["events"].as_array().into_iter().flatten() {
        t.add_row(vec![
            r["id"].to_string(),
            http_date(&r["at"]),
            cell(&r["kind"]),
            cell(&r["action"]),
            cell(&r["guest_id"]),
            cell(&r["actor"]),
            cell(&r["target"]),
            cell(&r["outcome"]),
            cell(&r["detail"]),
        ]);
    }
    println!("{t}");
    if !v["next_before"].is_null() {
        println!("more: --before {}", v["next_before"]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_page_size_in_a_fixed_order() {
        let args = EventsArgs {
            kind: Some("connect,disconnect".into()),
            guest: Some("g 1".into()),
            actor: None,
            limit: 2,
            before: Some(5),
        };
        assert_eq!(
            args.query(),
            "/kbs/v0/admin/events?limit=2&kind=connect%2Cdisconnect&guest_id=g%201&before=5"
        );
    }
}
