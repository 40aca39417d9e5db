//! `guest-daemon`: attest to a Tether (or Trustee) KBS and fetch resources, or run as the
//! guest's daemon holding a tunnel to the KBS (`run`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use guest_daemon::evidence::{EvidenceProvider, EvidenceSource, select_provider, tsm};
use guest_daemon::hook::PostApplyHook;
use guest_daemon::rcar::{KbsClient, KbsClientBuilder};
use guest_daemon::resource_path::ResourcePath;
use guest_daemon::run::{DEFAULT_STATE_DIR, RunConfig};
use guest_daemon::service::GuestDaemonService;
use guest_daemon::splitapi::SplitApiConfig;
use guest_daemon::store::StateStore;
use guest_daemon::tee_key::{KeyAlgorithm, TeeKeyPair};
use tokio_util::sync::CancellationToken;

/// Largest init-data file read.
const MAX_INIT_DATA_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Parser)]
#[command(version, about = "Tether guest daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the RCAR handshake and print the attestation token.
    Attest(AttestArgs),
    /// Fetch a resource and write its plaintext bytes to stdout.
    GetResource(GetResourceArgs),
    /// Run as the guest daemon: keep a tunnel to the KBS open and serve its calls
    /// (resource rotation, credentials, probes) until SIGINT or SIGTERM.
    Run(RunArgs),
    /// For guests that cannot keep a tunnel: attest, fetch this sandbox's splitapi
    /// credentials (GET /kbs/v0/splitapi/credentials) and install them into the state
    /// directory like a pushed bundle.
    SplitapiPull(SplitapiPullArgs),
    /// Generate a key in the guest (Ed25519 or P-256), attest, and have the KBS's `pki`
    /// plugin certify it (POST /kbs/v0/pki/sign) for this guest's attested identity; writes
    /// key.pem (0600), cert.pem and ca.pem into --out.
    PkiSign(PkiSignArgs),
    /// A provisioned VM's disk key (the KBS's `provisioner` plugin): attest with the
    /// init-data the host injected, fetch GET /kbs/v0/provisioner/default/<uuid>/root (the
    /// path named in that init-data), open it with the TEE key and write the LUKS passphrase
    /// (or, with --confdata, the whole confdata TOML) to stdout.
    DiskKey(DiskKeyArgs),
}

/// How to reach and attest to the KBS.
#[derive(Debug, Args)]
struct KbsArgs {
    /// KBS base URL, e.g. https://kbs.example:8080. `run` accepts it repeated (or
    /// comma-separated in TETHER_KBS_URL) and fails over between them in this order: it
    /// attests and opens its tunnel against the first that works, and moves to the next
    /// when that fails or the tunnel is lost. The one-shot commands use the first.
    #[arg(
        long = "kbs-url",
        env = "TETHER_KBS_URL",
        value_delimiter = ',',
        required = true,
        num_args = 1
    )]
    kbs_urls: Vec<String>,
    /// Init-data TOML file sent with the attestation.
    #[arg(long, value_name = "FILE")]
    init_data: Option<PathBuf>,
    /// PEM file of extra root certificates trusted for an https KBS.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// TEE key algorithm.
    #[arg(long, value_enum, default_value_t = KeyAlg::Ec)]
    key_alg: KeyAlg,
    /// Evidence source: the TDX/SNP TEE found through configfs-tsm, or the sample attester.
    #[arg(long, value_enum, env = "TETHER_TEE", default_value_t = TeeArg::Auto)]
    tee: TeeArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TeeArg {
    /// TDX or SNP through /sys/kernel/config/tsm/report; fails when there is none.
    Auto,
    /// The sample attester (development and tests; never trusted by a production policy).
    Sample,
}

impl KbsArgs {
    /// The first KBS URL (clap requires one).
    fn kbs_url(&self) -> &str {
        self.kbs_urls.first().map_or("", String::as_str)
    }
}

fn evidence(args: &KbsArgs) -> anyhow::Result<Box<dyn EvidenceProvider>> {
    let source = match args.tee {
        TeeArg::Auto => EvidenceSource::Auto,
        TeeArg::Sample => EvidenceSource::Sample,
    };
    select_provider(source, Path::new(tsm::TSM_REPORT_ROOT)).context(
        "choose the evidence source (--tee sample, or TETHER_TEE=sample, for the sample attester)",
    )
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyAlg {
    /// EC P-256 (ECDH-ES+A256KW).
    Ec,
    /// RSA 2048 (RSA-OAEP-256).
    Rsa,
}

impl From<KeyAlg> for KeyAlgorithm {
    fn from(k: KeyAlg) -> Self {
        match k {
            KeyAlg::Ec => KeyAlgorithm::EcP256,
            KeyAlg::Rsa => KeyAlgorithm::Rsa2048,
        }
    }
}

#[derive(Debug, Args)]
struct AttestArgs {
    #[command(flatten)]
    kbs: KbsArgs,
}

#[derive(Debug, Args)]
struct GetResourceArgs {
    /// Resource path: repository/type/tag
    path: ResourcePath,
    #[command(flatten)]
    kbs: KbsArgs,
    /// Passport mode: attest, then present the token as a bearer credential (no cookie).
    #[arg(long)]
    passport: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    kbs: KbsArgs,
    /// State directory (created 0700): the TEE key, kept across restarts, and the resources
    /// and credentials the KBS pushed. The default is on tmpfs, so nothing reaches the disk
    /// and a reboot starts afresh.
    #[arg(long, env = "TETHER_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Shell command run after each newly applied resource version, with TETHER_RESOURCE,
    /// TETHER_VERSION and TETHER_FILE in its environment (e.g. `systemctl reload app`).
    #[arg(long, value_name = "CMD")]
    hook: Option<String>,
    /// Address of the splitapi endpoint (HTTPS, client certificate required), started once
    /// the KBS has delivered this sandbox's splitapi credentials.
    #[arg(long, value_name = "ADDR", default_value = guest_daemon::splitapi::DEFAULT_LISTEN)]
    splitapi_listen: SocketAddr,
    /// Turn the splitapi endpoint off (the KBS is then not told the guest offers it).
    #[arg(long)]
    no_splitapi: bool,
    /// Address of the CDH-compatible resource endpoint
    /// (GET /cdh/resource/<repo>/<type>/<tag>; loopback clients only).
    #[arg(long, value_name = "ADDR", default_value = guest_daemon::cdh::DEFAULT_LISTEN)]
    cdh_listen: SocketAddr,
    /// Turn the CDH-compatible endpoint off.
    #[arg(long)]
    no_cdh: bool,
    /// Offer only the `tether.v1` tunnel: no per-tunnel push key, so pushes come sealed to
    /// the TEE key (an ECDH per push on each side).
    #[arg(long)]
    no_push_key: bool,
    /// Announce the `nebula` service: the KBS's `nebula-ca` plugin pushes this guest its
    /// Nebula credential (credentials/nebula/{ca.crt,node.crt,node.key}, from the `[nebula]`
    /// table of its init-data) and renews it before it expires.
    #[arg(long)]
    nebula: bool,
}

#[derive(Debug, Args)]
struct SplitapiPullArgs {
    #[command(flatten)]
    kbs: KbsArgs,
    /// State directory, as for `run` (its TEE key is the one attested and sealed to).
    #[arg(long, env = "TETHER_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct PkiSignArgs {
    #[command(flatten)]
    kbs: KbsArgs,
    /// State directory, as for `run` (its TEE key is the one attested with).
    #[arg(long, env = "TETHER_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Key type of the certified key, generated here.
    #[arg(long, value_enum, default_value_t = PkiKeyArg::Ed25519)]
    key_type: PkiKeyArg,
    /// Output directory (created 0700); default `<state-dir>/pki`.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DiskKeyArgs {
    #[command(flatten)]
    kbs: KbsArgs,
    /// Print the whole confdata TOML instead of the passphrase alone.
    #[arg(long)]
    confdata: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PkiKeyArg {
    /// Ed25519.
    Ed25519,
    /// ECDSA P-256.
    P256,
}

fn read_init_data(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("read init-data {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_INIT_DATA_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("read init-data {} (must be UTF-8 TOML)", path.display()))?;
    if text.len() as u64 > MAX_INIT_DATA_BYTES {
        bail!(
            "init-data {} is larger than {MAX_INIT_DATA_BYTES} bytes",
            path.display()
        );
    }
    Ok(text)
}

fn client(args: &KbsArgs) -> anyhow::Result<KbsClient> {
    let mut builder = KbsClientBuilder::new(args.kbs_url(), evidence(args)?)
        .key(TeeKeyPair::generate(args.key_alg.into())?);
    if let Some(path) = &args.init_data {
        builder = builder.init_data(read_init_data(path)?);
    }
    if let Some(path) = &args.ca_file {
        builder = builder.ca_file(path);
    }
    Ok(builder.build()?)
}

async fn attest(args: AttestArgs) -> anyhow::Result<()> {
    let token = client(&args.kbs)?.attest().await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{token}")?;
    out.flush()?;
    Ok(())
}

async fn get_resource(args: GetResourceArgs) -> anyhow::Result<()> {
    let mut client = client(&args.kbs)?;
    let plain = if args.passport {
        let token = client.attest().await?;
        client.get_resource_with_token(&token, &args.path).await?
    } else {
        client.get_resource(&args.path).await?
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&plain).context("write resource to stdout")?;
    out.flush().context("write resource to stdout")?;
    Ok(())
}

async fn run_daemon(args: RunArgs) -> anyhow::Result<()> {
    let evidence = evidence(&args.kbs)?;
    let mut urls = args.kbs.kbs_urls.clone().into_iter();
    let mut config = RunConfig::new(urls.next().unwrap_or_default(), args.state_dir);
    config.failover_urls = urls.collect();
    config.key_alg = args.kbs.key_alg.into();
    config.evidence = evidence;
    config.ca_file = args.kbs.ca_file;
    config.hook = args.hook.map(PostApplyHook::new);
    config.splitapi = (!args.no_splitapi).then(|| SplitApiConfig::new(args.splitapi_listen));
    config.cdh_listen = (!args.no_cdh).then_some(args.cdh_listen);
    config.push_key = !args.no_push_key;
    if args.nebula {
        config.extra_services.push("nebula".to_owned());
    }
    if let Some(path) = &args.kbs.init_data {
        config.init_data = Some(read_init_data(path)?);
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    guest_daemon::run::run(config, shutdown).await?;
    Ok(())
}

async fn splitapi_pull(args: SplitapiPullArgs) -> anyhow::Result<()> {
    let kbs = args.kbs;
    let key_alg: KeyAlgorithm = kbs.key_alg.into();
    let state_dir = args.state_dir;
    let (store, key) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let store = StateStore::open(state_dir)?;
        let key = store.try_load_or_create_tee_key(|| TeeKeyPair::generate(key_alg))?;
        Ok((store, key))
    })
    .await
    .context("open the state directory")??;
    let mut builder = KbsClientBuilder::new(kbs.kbs_url(), evidence(&kbs)?).key(key.clone());
    if let Some(path) = &kbs.init_data {
        builder = builder.init_data(read_init_data(path)?);
    }
    if let Some(path) = &kbs.ca_file {
        builder = builder.ca_file(path);
    }
    let mut client = builder.build()?;
    let service = GuestDaemonService::new(Arc::new(store), key, None);
    let installed = guest_daemon::splitapi::pull::pull(&mut client, &service).await?;
    let dir = service.store().bundle_dir(&installed.id);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} version {} {} in {}",
        installed.id,
        installed.version,
        if installed.already_held {
            "already held"
        } else {
            "installed"
        },
        dir.display()
    )?;
    out.flush()?;
    Ok(())
}

async fn pki_sign(args: PkiSignArgs) -> anyhow::Result<()> {
    let kbs = args.kbs;
    let key_alg: KeyAlgorithm = kbs.key_alg.into();
    let state_dir = args.state_dir;
    let out = args.out.unwrap_or_else(|| state_dir.join("pki"));
    let key = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let store = StateStore::open(state_dir)?;
        Ok(store.try_load_or_create_tee_key(|| TeeKeyPair::generate(key_alg))?)
    })
    .await
    .context("open the state directory")??;
    let mut builder = KbsClientBuilder::new(kbs.kbs_url(), evidence(&kbs)?).key(key);
    if let Some(path) = &kbs.init_data {
        builder = builder.init_data(read_init_data(path)?);
    }
    if let Some(path) = &kbs.ca_file {
        builder = builder.ca_file(path);
    }
    let mut client = builder.build()?;
    let key_type = match args.key_type {
        PkiKeyArg::Ed25519 => guest_daemon::pki::PkiKeyType::Ed25519,
        PkiKeyArg::P256 => guest_daemon::pki::PkiKeyType::P256,
    };
    let signed = guest_daemon::pki::sign(&mut client, key_type).await?;
    let dir = out.clone();
    let not_after = signed.not_after;
    let guest_id = signed.identity.guest_id.clone();
    tokio::task::spawn_blocking(move || guest_daemon::pki::write_out(&dir, &signed))
        .await
        .context("write the certificate")??;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "certificate for {guest_id} (not after {not_after}) in {}",
        out.display()
    )?;
    stdout.flush()?;
    Ok(())
}

async fn disk_key(args: DiskKeyArgs) -> anyhow::Result<()> {
    let Some(init_path) = &args.kbs.init_data else {
        bail!(
            "--init-data is required: the initdata.toml the host injected (the provisioner's oemstring, decoded)"
        );
    };
    let path = guest_daemon::disk_key::provisioner_path(&read_init_data(init_path)?)?;
    let mut client = client(&args.kbs)?;
    let confdata = guest_daemon::disk_key::fetch(&mut client, &path).await?;
    let mut out = std::io::stdout().lock();
    // No newline after the passphrase: `cryptsetup --key-file=-` reads every byte.
    if args.confdata {
        out.write_all(confdata.toml.as_bytes())?;
    } else {
        out.write_all(confdata.root_key.as_bytes())?;
    }
    out.flush().context("write to stdout")?;
    Ok(())
}

/// Cancel `shutdown` on the first SIGINT or SIGTERM.
fn cancel_on_signal(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
    });
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attest(args) => attest(args).await,
        Command::GetResource(args) => get_resource(args).await,
        Command::Run(args) => run_daemon(args).await,
        Command::SplitapiPull(args) => splitapi_pull(args).await,
        Command::PkiSign(args) => pki_sign(args).await,
        Command::DiskKey(args) => disk_key(args).await,
    }
}

/// Log to stderr; `RUST_LOG` overrides the default level (`info` for the daemon, whose
/// state changes are its log, `warn` for the one-shot commands).
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    });
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
