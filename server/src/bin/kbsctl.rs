//! `kbsctl`: the operator's command line for a Tether KBS.

use std::io::Read;
use std::path::PathBuf;

#[path = "kbsctl/rollout.rs"]
mod rollout;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use kbs_core::admin_key::AdminKeyPair;
use reqwest::Method;
use rpc_defs::ProbeKind;
use serde_json::Value;
use server::admin_client::AdminClient;

/// Operate a Tether KBS: resources, policy, audit, connected guests.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// KBS base URL.
    #[arg(
        long,
        env = "KBS_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Admin private key (Ed25519 PKCS#8 PEM).
    #[arg(
        long,
        env = "KBS_ADMIN_KEY",
        default_value = "./data/admin.key",
        global = true
    )]
    admin_key: PathBuf,
    /// CA certificate (PEM) to trust for an https KBS.
    #[arg(long, env = "KBS_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Role claimed in the admin token.
    #[arg(long, env = "KBS_ROLE", default_value = "admin", global = true)]
    role: String,
    /// Subject claimed in the admin token (audit log shows it).
    #[arg(long, env = "KBS_SUBJECT", default_value = "kbsctl", global = true)]
    subject: String,
    /// Output format for listings.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Resources: upload versions, list them, delete.
    #[command(subcommand)]
    Resource(ResourceCmd),
    /// The resource policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Guests connected over the tunnel: list, ping, probe.
    #[command(subcommand)]
    Guests(GuestsCmd),
    /// Key rotation rollouts: start, status (live progress), list, pause, resume, cancel.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Probe guests through their tunnels: one by id, or many by label selector.
    Probe(ProbeArgs),
    /// Print an admin token (JWT) to paste into the dashboard's login (`/dashboard`).
    Token {
        /// Validity; the dashboard session never outlives it (and lasts at most 15 minutes).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Read the event log (connects, disconnects, admin actions, policy, rollouts), newest first.
    Events {
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
    },
    /// Plugins: list, enable, disable (effective at once, kept across restarts).
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// splitapi: the workload owner's client credentials for a sandbox.
    #[command(subcommand)]
    Splitapi(SplitapiCmd),
    /// Read the audit log (newest first).
    Audit {
        /// Only this action (`resource.*` for a prefix).
        #[arg(long)]
        action: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
enum ResourceCmd {
    /// Upload FILE (or `-` for stdin) as a new version of <repo>/<type>/<tag>.
    Put { path: String, file: PathBuf },
    /// List the versions of <repo>/<type>/<tag>.
    Versions { path: String },
    /// Delete <repo>/<type>/<tag> (its plaintext is erased).
    Delete { path: String },
}

#[derive(Subcommand, Debug)]
enum PluginCmd {
    /// List plugins with their kind, state and version.
    List,
    /// Enable a plugin.
    Enable { name: String },
    /// Disable a plugin: its routes answer 404, it gets no events, its tasks stop.
    Disable { name: String },
}

#[derive(Subcommand, Debug)]
enum SplitapiCmd {
    /// Fetch the owner's client bundle of a sandbox and write ca.crt, client.crt, client.key
    /// (the key 0600) into DIR.
    ClientCreds {
        guest_id: String,
        /// Directory to write the three files into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Install a Rego resource policy from FILE.
    Set { file: PathBuf },
    /// Print the current resource policy.
    Get,
}

#[derive(Subcommand, Debug)]
enum GuestsCmd {
    /// List guests: every known one by default, filtered by selector, drift and connection.
    List {
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
    },
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
#[command(group(clap::ArgGroup::new("target").required(true).args(["guest_id", "selector"])))]
struct ProbeArgs {
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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("kbsctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let key = AdminKeyPair::load(&cli.admin_key)
        .with_context(|| "set --admin-key or KBS_ADMIN_KEY".to_string())?;
    if let Command::Token { ttl } = &cli.command {
        let token = key.sign(&kbs_core::admin_key::AdminTokenRequest::new(
            &cli.subject,
            &cli.role,
            *ttl,
        ))?;
        println!("{token}");
        return Ok(());
    }
    let client = AdminClient::new(&cli.url, key, cli.ca_file.as_deref())?
        .with_identity(&cli.subject, &cli.role);
    match cli.command {
        Command::Rollout(cmd) => rollout::run(&client, cmd, cli.output == Output::Json).await?,
        Command::Resource(ResourceCmd::Put { path, file }) => {
            let data = read_input(&file)?;
            let v = client.put_resource(&path, data).await?;
            print_value(cli.output, &v, |v| {
                format!(
                    "stored {} version {} (sha256 {})",
                    s(&v["path"]),
                    v["version"],
                    s(&v["sha256"])
                )
            });
        }
        Command::Resource(ResourceCmd::Versions { path }) => {
            let v = client.resource_versions(&path).await?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&["VERSION", "SHA256", "SIZE", "CREATED", "BY", "STATE"]);
                for r in v["versions"].as_array().into_iter().flatten() {
                    t.add_row(vec![
                        r["version"].to_string(),
                        s(&r["sha256"]).chars().take(16).collect::<String>(),
                        r["size"].to_string(),
                        fmt_ms(&r["created_at"]),
                        s(&r["created_by"]),
                        if r["deleted"].as_bool() == Some(true) {
                            "deleted".into()
                        } else {
                            "live".into()
                        },
                    ]);
                }
                println!("{t}");
            }
        }
        Command::Resource(ResourceCmd::Delete { path }) => {
            let v = client.delete_resource(&path).await?;
            print_value(cli.output, &v, |_| format!("deleted {path}"));
        }
        Command::Policy(PolicyCmd::Set { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let v = client.set_policy(&text).await?;
            print_value(cli.output, &v, |v| {
                format!("policy installed (version {})", v["version"])
            });
        }
        Command::Policy(PolicyCmd::Get) => {
            let (text, version) = client.get_policy().await?;
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"version": version, "policy": text})
                );
            } else {
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
            }
        }
        Command::Guests(GuestsCmd::List {
            selector,
            stale,
            connected,
            disconnected,
            limit,
            no_follow,
        }) => {
            let mut q = format!(
                "/kbs/v0/admin/guests?limit={limit}&connected={}",
                if connected {
                    "true"
                } else if disconnected {
                    "false"
                } else {
                    "any"
                }
            );
            if let Some(sel) = &selector {
                q.push_str(&format!("&selector={}", urlencode(sel)));
            }
            if let Some(path) = &stale {
                q.push_str(&format!("&stale={}", urlencode(path)));
            }
            let mut guests: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let url = match &cursor {
                    Some(c) => format!("{q}&cursor={}", urlencode(c)),
                    None => q.clone(),
                };
                let v = client.send(Method::GET, &url, None).await?;
                guests.extend(v["guests"].as_array().cloned().unwrap_or_default());
                cursor = v["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() || no_follow {
                    break;
                }
            }
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"guests": guests}))?
                );
            } else {
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
                    let labels: Vec<String> = g["labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", s(v)))
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
                        let reason = s(&g["history"][0]["reason"]);
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
                            s(&g["last_probe"]["outcome"]),
                            fmt_ms(&g["last_probe"]["at"])
                        )
                    };
                    t.add_row(vec![
                        s(&g["guest_id"]),
                        state,
                        labels.join(","),
                        s(&g["tee"]),
                        s(&g["daemon_version"]),
                        held.join(" "),
                        probe,
                        fmt_ms(&g["last_seen"]),
                    ]);
                }
                println!("{t}");
                println!("{} guest(s)", guests.len());
            }
        }
        Command::Guests(GuestsCmd::Ping { guest_id }) => {
            let rtt = client.ping_guest(&guest_id).await?;
            let v = serde_json::json!({"guest_id": guest_id, "rtt_us": rtt});
            print_value(cli.output, &v, |_| {
                format!("pong from {guest_id}: {rtt} us")
            });
        }
        Command::Guests(GuestsCmd::Probe { guest_id, kind }) => {
            let report = client.probe_guest(&guest_id, kind).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Token { .. } => {}
        Command::Probe(args) => {
            let v = match (&args.guest_id, &args.selector) {
                (Some(id), _) => {
                    let body = serde_json::json!({"kind": args.kind});
                    client
                        .send(
                            Method::POST,
                            &format!("/kbs/v0/probes/{}", urlencode(id)),
                            Some(server::admin_client::RequestBody::Json(body)),
                        )
                        .await?
                }
                (None, selector) => {
                    let body = serde_json::json!({
                        "selector": selector.clone().unwrap_or_default(),
                        "kind": args.kind,
                        "concurrency": args.concurrency,
                        "deadline_ms": args.deadline_ms,
                    });
                    client
                        .send(
                            Method::POST,
                            "/kbs/v0/probes",
                            Some(server::admin_client::RequestBody::Json(body)),
                        )
                        .await?
                }
            };
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
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
                        .map(|h| format!("{}@{}", s(&h["uri"]), h["version"]))
                        .collect();
                    t.add_row(vec![
                        s(&r["guest_id"]),
                        s(&r["outcome"]),
                        format!("{:.1} ms", r["rtt_us"].as_f64().unwrap_or(0.0) / 1000.0),
                        s(&r["report"]["health"]["healthy"]),
                        held.join(" "),
                        s(&r["error"]),
                    ]);
                }
                println!("{t}");
                if let Some(summary) = v["summary"].as_object() {
                    let parts: Vec<String> =
                        summary.iter().map(|(k, n)| format!("{k}: {n}")).collect();
                    println!(
                        "{} selected in {} ms; {}",
                        v["selected"],
                        v["elapsed_ms"],
                        parts.join(", ")
                    );
                }
            }
        }
        Command::Events {
            kind,
            guest,
            actor,
            limit,
            before,
        } => {
            let mut q = format!("/kbs/v0/admin/events?limit={limit}");
            for (k, v) in [("kind", &kind), ("guest_id", &guest), ("actor", &actor)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", urlencode(v)));
                }
            }
            if let Some(b) = before {
                q.push_str(&format!("&before={b}"));
            }
            let v = client.send(Method::GET, &q, None).await?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&[
                    "ID", "AT", "KIND", "ACTION", "GUEST", "ACTOR", "TARGET", "OUTCOME", "DETAIL",
                ]);
                for r in v["events"].as_array().into_iter().flatten() {
                    t.add_row(vec![
                        r["id"].to_string(),
                        fmt_ms(&r["at"]),
                        s(&r["kind"]),
                        s(&r["action"]),
                        s(&r["guest_id"]),
                        s(&r["actor"]),
                        s(&r["target"]),
                        s(&r["outcome"]),
                        s(&r["detail"]),
                    ]);
                }
                println!("{t}");
                if !v["next_before"].is_null() {
                    println!("more: --before {}", v["next_before"]);
                }
            }
        }
        Command::Plugin(PluginCmd::List) => {
            let v = client.list_plugins().await?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&["NAME", "KIND", "KINDS", "ENABLED", "VERSION"]);
                for p in v["plugins"].as_array().into_iter().flatten() {
                    let kinds: Vec<String> =
                        p["kinds"].as_array().into_iter().flatten().map(s).collect();
                    t.add_row(vec![
                        s(&p["name"]),
                        s(&p["kind"]),
                        kinds.join(","),
                        s(&p["enabled"]),
                        s(&p["version"]),
                    ]);
                }
                println!("{t}");
            }
        }
        Command::Plugin(PluginCmd::Enable { name }) => {
            let v = client.set_plugin_enabled(&name, true).await?;
            print_value(cli.output, &v, |v| {
                let how = if v["changed"].as_bool() == Some(true) {
                    ""
                } else {
                    " (already)"
                };
                format!("plugin {name} enabled{how}")
            });
        }
        Command::Plugin(PluginCmd::Disable { name }) => {
            let v = client.set_plugin_enabled(&name, false).await?;
            print_value(cli.output, &v, |v| {
                let how = if v["changed"].as_bool() == Some(true) {
                    ""
                } else {
                    " (already)"
                };
                format!("plugin {name} disabled{how}")
            });
        }
        Command::Splitapi(SplitapiCmd::ClientCreds { guest_id, out }) => {
            let bundle = client.splitapi_client_creds(&guest_id).await?;
            bundle
                .write_to(&out)
                .with_context(|| format!("writing the client bundle into {}", out.display()))?;
            let v = serde_json::json!({
                "guest_id": bundle.guest_id,
                "version": bundle.version,
                "not_after": bundle.not_after,
                "dir": out.display().to_string(),
                "files": ["ca.crt", "client.crt", "client.key"],
            });
            print_value(cli.output, &v, |_| {
                format!(
                    "wrote ca.crt, client.crt, client.key (0600) for {guest_id} (version {}) into {}",
                    bundle.version,
                    out.display()
                )
            });
        }
        Command::Audit { action, limit } => {
            let mut q = format!("/kbs/v0/admin/audit?limit={limit}");
            if let Some(a) = action {
                q.push_str(&format!("&action={}", urlencode(&a)));
            }
            let v = client.send(Method::GET, &q, None).await?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = table(&[
                    "ID", "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "OUTCOME", "DETAIL",
                ]);
                for r in v["records"].as_array().into_iter().flatten() {
                    t.add_row(vec![
                        r["id"].to_string(),
                        fmt_ms(&r["at"]),
                        s(&r["actor"]),
                        s(&r["role"]),
                        s(&r["action"]),
                        s(&r["target"]),
                        s(&r["outcome"]),
                        s(&r["detail"]),
                    ]);
                }
                println!("{t}");
            }
        }
    }
    Ok(())
}

fn read_input(file: &PathBuf) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        return Ok(buf);
    }
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(headers.to_vec());
    t
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| {
        if v.is_null() {
            String::new()
        } else {
            v.to_string()
        }
    })
}

fn fmt_ms(v: &Value) -> String {
    let ms = v.as_u64().unwrap_or(0);
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_value(output: Output, v: &Value, human: impl Fn(&Value) -> String) {
    match output {
        Output::Json => println!("{v}"),
        Output::Table => println!("{}", human(v)),
    }
}
