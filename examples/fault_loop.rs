//! Kill -9 fault loop (issue 17): a real `kbs` process with a data directory, N simulated
//! guests in this process (each attests for real with the sample TEE, holds a real tunnel and
//! opens every push with its own key), then per iteration a new resource version rolled out
//! to all of them, the KBS killed with SIGKILL while some targets are acked and others
//! pending, restarted on the same data directory and port, the guests back, the rollout
//! followed to its end. At the end it checks that every guest applied each version exactly
//! once, every rollout finished with all targets acked, and each rollout's acked count equals
//! the guests' own count; it exits non-zero on any violation. The loop itself is the test
//! kit's (`tests::run_fault_loop`), which `tests/tests/fault_loop.rs` runs small in CI.
//!
//! ```sh
//! cargo build --release --bin kbs
//! cargo run --release -p examples --example fault_loop -- --guests 1000 --iterations 100
//! ```

use std::time::Duration;

use clap::Parser;
use examples::default_kbs_bin;
use tests::{FaultLoopConfig, run_fault_loop};

#[derive(Parser, Debug)]
struct Args {
    /// Simulated guests.
    #[arg(long, default_value_t = 1000)]
    guests: usize,
    /// Kill-restart rounds (a new version each).
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Pushes in flight per rollout (small, so that the kill lands mid-rollout).
    #[arg(long, default_value_t = 32)]
    max_concurrent: u32,
    /// Milliseconds a guest takes to apply a version before it answers (the daemon's hook).
    #[arg(long, default_value_t = 5)]
    apply_ms: u64,
    /// Guests attesting and connecting at once at set-up.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The kbs binary (default: next to this example, target/<profile>/kbs).
    #[arg(long)]
    kbs_bin: Option<std::path::PathBuf>,
    /// RUST_LOG of the KBS.
    #[arg(long, default_value = "error")]
    kbs_log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = examples::block_on_multi_thread(async {
        let mut config = FaultLoopConfig::new(
            args.kbs_bin.clone().unwrap_or_else(default_kbs_bin),
            args.guests,
            args.iterations,
        );
        config.max_concurrent = args.max_concurrent;
        config.apply_time = Duration::from_millis(args.apply_ms);
        config.connect_concurrency = args.connect_concurrency;
        config.kbs_log = args.kbs_log.clone();
        println!(
            "fault loop: {} guests, {} iterations, kbs {}",
            args.guests,
            args.iterations,
            config.kbs_bin.display()
        );
        run_fault_loop(&config).await
    })?;
    report.print();
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
