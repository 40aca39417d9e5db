//! `kbs`: start the Tether Key Broker Service.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use server::app::Kbs;
use server::config::{Config, LogFormat, TlsConfig};

/// Tether KBS. With no configuration it starts a development instance: data in ./data,
/// a generated admin key, HTTP on 127.0.0.1:8080.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, env = "KBS_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides http.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format (overrides log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Serve TLS with a generated self-signed certificate (development).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_self_signed: bool,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(listen) = args.listen {
        config.http.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.storage.data_dir = dir;
    }
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    if args.tls_self_signed {
        config.http.tls = Some(TlsConfig {
            self_signed: true,
            ..Default::default()
        });
    } else if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.http.tls = Some(TlsConfig {
            cert_file: Some(cert),
            key_file: Some(key),
            ..Default::default()
        });
    }
    init_tracing(&config);

    let listen = config.http.listen;
    let data_dir = config.storage.data_dir.clone();
    // Bound before the build: while a PostgreSQL database is out of reach at start, the
    // build waits for it and this address answers `/healthz` (alive) and `/readyz` (503).
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let waiting = tokio_util::sync::CancellationToken::new();
    let postgres = kbs_core::storage::Engine::of(&config.storage.database_url())
        .is_ok_and(|e| e == kbs_core::storage::Engine::Postgres);
    let starting = if postgres {
        let early = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
        let (config, waiting) = (config.clone(), waiting.clone());
        Some(tokio::spawn(async move {
            if let Err(e) = Kbs::serve_while_starting(&config, early, waiting).await {
                tracing::warn!(error = %e, "nothing answers while the KBS starts");
            }
        }))
    } else {
        None
    };
    let kbs = Kbs::build(config).await;
    waiting.cancel();
    if let Some(starting) = starting {
        let _ = starting.await;
    }
    let kbs = kbs?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let scheme = if kbs.is_tls() { "https" } else { "http" };
    tracing::info!(%addr, tls = kbs.is_tls(), data_dir = %data_dir.display(), "Tether KBS listening");
    print_next_steps(scheme, addr, &kbs, &data_dir);

    let shutdown = kbs.state.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining connections");
        shutdown.cancel();
    });
    kbs.serve(listener).await?;
    tracing::info!("stopped");
    Ok(())
}

fn print_next_steps(scheme: &str, addr: SocketAddr, kbs: &Kbs, data_dir: &std::path::Path) {
    let url = format!("{scheme}://{addr}");
    println!(
        "Tether KBS listening on {url} (data in {})",
        data_dir.display()
    );
    if let Some(key) = &kbs.dev_admin_key {
        let state = if kbs.dev_admin_key_created {
            "generated"
        } else {
            "reused"
        };
        let ca = if scheme == "https" {
            format!(" KBS_CA_FILE={}", data_dir.join("tls/cert.pem").display())
        } else {
            String::new()
        };
        let ca_flag = if scheme == "https" {
            format!(" --ca-file {}", data_dir.join("tls/cert.pem").display())
        } else {
            String::new()
        };
        println!("Development admin key ({state}): {}", key.display());
        println!("Next, in another shell:");
        println!("  export KBS_URL={url} KBS_ADMIN_KEY={}{ca}", key.display());
        println!("  printf 'my first secret' > secret.txt");
        println!("  cargo run -q --bin kbsctl -- resource put default/key/demo secret.txt");
        println!("  cargo run -q --bin kbsctl -- policy set examples/policies/allow-sample.rego");
        println!(
            "  cargo run -q --bin guest-daemon -- get-resource default/key/demo --kbs-url {url}{ca_flag}"
        );
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
