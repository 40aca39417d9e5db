//! `kbsctl rollout ...`: start, follow and control key rotation rollouts.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kbs_core::storage::{TargetRecord, TargetState};
use plugin_rotation::{Control, RolloutView, StartRollout};
use server::admin_client::{AdminClient, RolloutUpdate, RolloutWatch};

use crate::output::{Output, table};
use crate::query::urlencode;

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Push a version of <repo>/<type>/<tag> to every guest the selector picks.
    Start {
        /// Resource path.
        path: String,
        /// Label selector, e.g. `app=db,env in (prod,staging)` (empty: every guest).
        #[arg(long)]
        selector: String,
        /// Version to deliver (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        /// Pushes in flight at once (batch size).
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Pushes per guest before it is failed.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Deadline of one push (e.g. `30s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        guest_deadline: Option<Duration>,
        /// Overall deadline (e.g. `1h`); undelivered guests then fail.
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// Follow the rollout with a progress bar until nothing is outstanding.
        #[arg(long)]
        wait: bool,
    },
    /// Show a rollout: counts, and the failed and denied guests.
    Status {
        /// Rollout id.
        id: i64,
        /// Follow it with a live progress bar until nothing is outstanding.
        #[arg(long)]
        watch: bool,
    },
    /// List rollouts, newest first.
    List {
        /// Also rollouts no longer in force (cancelled, superseded, expired).
        #[arg(long)]
        all: bool,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stop starting pushes (in-flight ones finish).
    Pause { id: i64 },
    /// Start pushing again.
    Resume { id: i64 },
    /// Stop the rollout for good.
    Cancel { id: i64 },
}

pub async fn run(cmd: RolloutCmd, client: &AdminClient, output: Output) -> anyhow::Result<()> {
    let json = output.is_json();
    match cmd {
        RolloutCmd::Start {
            path,
            selector,
            version,
            max_concurrent,
            max_attempts,
            guest_deadline,
            deadline,
            wait,
        } => {
            let req = StartRollout {
                path,
                version,
                selector,
                max_concurrent,
                max_attempts,
                guest_deadline_s: guest_deadline.map(|d| d.as_secs().max(1)),
                deadline_s: deadline.map(|d| d.as_secs().max(1)),
            };
            let v = client.start_rollout(&req).await?;
            if json && !wait {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            eprintln!(
                "rollout {} started: {} version {} to `{}` ({} guests known)",
                v.rollout.id, v.rollout.path, v.rollout.version, v.rollout.selector, v.total
            );
            if wait {
                follow(client, v.rollout.id, json).await?;
            } else if !json {
                println!("{}", v.rollout.id);
            }
        }
        RolloutCmd::Status { id, watch } => {
            if watch {
                follow(client, id, json).await?;
            } else {
                let detail = client.rollout(id, "limit=1").await?;
                report(client, &detail.view, json).await?;
            }
        }
        RolloutCmd::List { all, limit } => {
            let list = client.list_rollouts(!all, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let mut t = table(&[
                "ID", "PATH", "VERSION", "SELECTOR", "STATE", "ACKED", "PENDING", "FAILED",
                "DENIED", "TOTAL", "BY",
            ]);
            for v in &list.rollouts {
                t.add_row(vec![
                    v.rollout.id.to_string(),
                    v.rollout.path.clone(),
                    v.rollout.version.to_string(),
                    v.rollout.selector.clone(),
                    v.rollout.state.to_string(),
                    v.count(TargetState::Acked).to_string(),
                    (v.count(TargetState::Pending) + v.count(TargetState::Delivering)).to_string(),
                    v.count(TargetState::Failed).to_string(),
                    v.count(TargetState::Denied).to_string(),
                    v.total.to_string(),
                    v.rollout.created_by.clone(),
                ]);
            }
            println!("{t}");
        }
        RolloutCmd::Pause { id } => control(client, id, Control::Pause, json).await?,
        RolloutCmd::Resume { id } => control(client, id, Control::Resume, json).await?,
        RolloutCmd::Cancel { id } => control(client, id, Control::Cancel, json).await?,
    }
    Ok(())
}

async fn control(client: &AdminClient, id: i64, action: Control, json: bool) -> anyhow::Result<()> {
    let v = client.control_rollout(id, action).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("rollout {id}: {}", v.rollout.state);
    }
    Ok(())
}

fn summary(v: &RolloutView) -> String {
    format!(
        "{} | acked {} | delivering {} | pending {} | failed {} | denied {}",
        v.rollout.state,
        v.count(TargetState::Acked),
        v.count(TargetState::Delivering),
        v.count(TargetState::Pending),
        v.count(TargetState::Failed),
        v.count(TargetState::Denied),
    )
}

/// Times `follow` opens the event stream again after it ended while the rollout still ran.
const REOPENS: u32 = 5;

/// A live progress bar fed by the rollout's event stream, until nothing is outstanding. A
/// stream that ends while the rollout is still running (the replica drains or restarts)
/// is opened again, on whichever replica answers.
async fn follow(client: &AdminClient, id: i64, json: bool) -> anyhow::Result<()> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut reopens = 0;
    loop {
        let mut watch = client
            .watch_rollout(id)
            .await
            .with_context(|| format!("following rollout {id}"))?;
        if follow_stream(&mut watch, &bar).await? {
            break;
        }
        reopens += 1;
        if reopens > REOPENS {
            bar.abandon();
            anyhow::bail!(
                "rollout {id}: its event stream ended {reopens} times before the rollout did; see `kbsctl rollout status {id}`"
            );
        }
        bar.println(format!(
            "rollout {id}: the event stream ended before the rollout; following it again"
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bar.finish();
    let detail = client.rollout(id, "limit=1").await?;
    report(client, &detail.view, json).await
}

/// Feeds `bar` from one event stream; whether the rollout reached its end (nothing
/// outstanding, or out of force) before the stream ended.
async fn follow_stream(watch: &mut RolloutWatch, bar: &ProgressBar) -> anyhow::Result<bool> {
    let mut view: Option<RolloutView> = None;
    while let Some(update) = watch.next().await? {
        match update {
            RolloutUpdate::Snapshot(v) => view = Some(v),
            RolloutUpdate::Change(e) => {
                if let Some(v) = view.as_mut() {
                    v.apply(&e);
                }
            }
            RolloutUpdate::Error { name, detail } => {
                bar.println(format!("warning: {name}: {detail}"));
                continue;
            }
        }
        let Some(v) = view.as_ref() else { continue };
        let settled = v.count(TargetState::Acked)
            + v.count(TargetState::Failed)
            + v.count(TargetState::Denied);
        bar.set_length(v.total);
        bar.set_position(settled);
        bar.set_message(summary(v));
        if !v.rollout.state.in_force() || v.outstanding() == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Counts, then a table of the guests that failed or were denied.
async fn report(client: &AdminClient, v: &RolloutView, json: bool) -> anyhow::Result<()> {
    let mut problems: Vec<TargetRecord> = Vec::new();
    for state in ["failed", "denied"] {
        let mut after: Option<String> = None;
        loop {
            let mut q = format!("state={state}&limit=1000");
            if let Some(a) = &after {
                q.push_str(&format!("&after={}", urlencode(a)));
            }
            let page = client.rollout(v.rollout.id, &q).await?;
            problems.extend(page.targets);
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
    }
    if json {
        let out = serde_json::json!({"rollout": v, "problems": problems});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "rollout {}: {} version {} to `{}`, {} guests: {}",
        v.rollout.id,
        v.rollout.path,
        v.rollout.version,
        v.rollout.selector,
        v.total,
        summary(v)
    );
    if !v.rollout.detail.is_empty() {
        println!("  {}", v.rollout.detail);
    }
    if !problems.is_empty() {
        let mut t = table(&["GUEST", "STATE", "ATTEMPTS", "REASON"]);
        for p in &problems {
            t.add_row(vec![
                p.guest_id.clone(),
                p.state.to_string(),
                p.attempts.to_string(),
                p.reason.clone(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
