//! `kbsctl`: the operator's command line for a Tether KBS.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use reqwest::Method;
use serde_json::Value;
use server::admin::client::AdminClient;
use server::admin::token::AdminKeyPair;
use server::http::guests::ProbeSelector;

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
enum PolicyCmd {
    /// Install a Rego resource policy from FILE.
    Set { file: PathBuf },
    /// Print the current resource policy.
    Get,
}

#[derive(Subcommand, Debug)]
enum GuestsCmd {
    /// List the guests with a live tunnel.
    List,
    /// Echo 256 bytes through a guest's tunnel and print the round-trip time.
    Ping { guest_id: String },
    /// Ask a guest for health, held resources and runtime figures (pretty JSON).
    Probe {
        guest_id: String,
        /// What to probe.
        #[arg(long, value_enum, default_value = "all")]
        kind: ProbeSelector,
    },
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
    let client = AdminClient::new(&cli.url, key, cli.ca_file.as_deref())?
        .with_identity(&cli.subject, &cli.role);
    match cli.command {
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
        Command::Guests(GuestsCmd::List) => {
            let guests = client.list_guests().await?;
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"guests": guests}))?
                );
            } else {
                let mut t = table(&[
                    "GUEST",
                    "LABELS",
                    "INSTANCE",
                    "VERSION",
                    "CONNECTED",
                    "LAST SEEN",
                ]);
                for g in &guests {
                    let labels: Vec<String> =
                        g.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    t.add_row(vec![
                        g.guest_id.clone(),
                        labels.join(","),
                        g.instance.clone(),
                        g.daemon_version.clone(),
                        fmt_ms(&Value::from(g.connected_since)),
                        fmt_ms(&Value::from(g.last_seen)),
                    ]);
                }
                println!("{t}");
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
