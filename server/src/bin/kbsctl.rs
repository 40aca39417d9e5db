//! `kbsctl`: the operator's command line for a Tether KBS. This file holds the global options
//! and the dispatch; each subcommand is a module under `kbsctl/`.

use std::path::PathBuf;

#[path = "kbsctl/audit.rs"]
mod audit;
#[path = "kbsctl/events.rs"]
mod events;
#[path = "kbsctl/evidence.rs"]
mod evidence;
#[path = "kbsctl/guests.rs"]
mod guests;
#[path = "kbsctl/output.rs"]
mod output;
#[path = "kbsctl/plugin.rs"]
mod plugin;
#[path = "kbsctl/policy.rs"]
mod policy;
#[path = "kbsctl/probe.rs"]
mod probe;
#[path = "kbsctl/provisioner.rs"]
mod provisioner;
#[path = "kbsctl/query.rs"]
mod query;
#[path = "kbsctl/reference_values.rs"]
mod reference_values;
#[path = "kbsctl/resource.rs"]
mod resource;
#[path = "kbsctl/rollout.rs"]
mod rollout;
#[path = "kbsctl/splitapi.rs"]
mod splitapi;
#[path = "kbsctl/token.rs"]
mod token;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kbs_core::admin_key::AdminKeyPair;
use server::admin_client::AdminClient;

use output::Output;

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

#[derive(Subcommand, Debug)]
enum Command {
    /// Resources: upload versions, list them, delete.
    #[command(subcommand)]
    Resource(resource::ResourceCmd),
    /// The resource policy.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Guests connected over the tunnel: list, ping, probe.
    #[command(subcommand)]
    Guests(guests::GuestsCmd),
    /// Key rotation rollouts: start, status (live progress), list, pause, resume, cancel.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Probe guests through their tunnels: one by id, or many by label selector.
    Probe(probe::ProbeArgs),
    /// Print an admin token (JWT) to paste into the dashboard's login (`/dashboard`).
    Token(token::TokenArgs),
    /// Read the event log (connects, disconnects, admin actions, policy, rollouts), newest first.
    Events(events::EventsArgs),
    /// Plugins: list, enable, disable (effective at once, kept across restarts).
    #[command(subcommand)]
    Plugin(plugin::PluginCmd),
    /// splitapi: the workload owner's client credentials for a sandbox.
    #[command(subcommand)]
    Splitapi(splitapi::SplitapiCmd),
    /// Per-VM disk keys (provisioner plugin): provision, list, delete.
    #[command(subcommand)]
    Provisioner(provisioner::ProvisionerCmd),
    /// Read the audit log (newest first).
    Audit(audit::AuditArgs),
    /// Reference values the appraisal policy checks evidence against: set, list, delete.
    #[command(subcommand)]
    ReferenceValues(reference_values::ReferenceValuesCmd),
    /// The appraisal policy (Rego) that rates evidence: set, get.
    #[command(subcommand)]
    AppraisalPolicy(reference_values::AppraisalPolicyCmd),
    /// Verify TDX or SNP evidence offline and print its claims (no KBS, no admin key).
    #[command(subcommand)]
    Evidence(evidence::EvidenceCmd),
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
    // Loaded first by every subcommand but `evidence` (offline), so a missing key fails
    // them all the same way.
    let key = || {
        AdminKeyPair::load(&cli.admin_key)
            .with_context(|| "set --admin-key or KBS_ADMIN_KEY".to_string())
    };
    // Built only by the subcommands that talk to the KBS (`token` signs locally).
    let client = |key| -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&cli.url, key, cli.ca_file.as_deref())?
            .with_identity(&cli.subject, &cli.role))
    };
    let output = cli.output;
    match cli.command {
        Command::Token(args) => token::run(args, &key()?, &cli.subject, &cli.role),
        Command::Resource(cmd) => resource::run(cmd, &client(key()?)?, output).await,
        Command::Policy(cmd) => policy::run(cmd, &client(key()?)?, output).await,
        Command::Guests(cmd) => guests::run(cmd, &client(key()?)?, output).await,
        Command::Rollout(cmd) => rollout::run(cmd, &client(key()?)?, output).await,
        Command::Probe(args) => probe::run(args, &client(key()?)?, output).await,
        Command::Events(args) => events::run(args, &client(key()?)?, output).await,
        Command::Plugin(cmd) => plugin::run(cmd, &client(key()?)?, output).await,
        Command::Splitapi(cmd) => splitapi::run(cmd, &client(key()?)?, output).await,
        Command::Provisioner(cmd) => provisioner::run(cmd, &client(key()?)?, output).await,
        Command::Audit(args) => audit::run(args, &client(key()?)?, output).await,
        Command::ReferenceValues(cmd) => reference_values::run(cmd, &client(key()?)?, output).await,
        Command::AppraisalPolicy(cmd) => {
            reference_values::run_policy(cmd, &client(key()?)?, output).await
        }
        Command::Evidence(cmd) => evidence::run(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
