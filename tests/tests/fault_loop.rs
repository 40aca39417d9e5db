#![allow(clippy::unwrap_used)]
//! The kill -9 fault loop of `examples/fault_loop.rs`, small: the real `kbs` binary killed in
//! the middle of a rollout and restarted on the same data directory and port, three times,
//! with twenty simulated guests on real tunnels. Every guest applies every version exactly
//! once, every rollout finishes with all its targets acked, and the acked counts match what
//! the guests themselves applied.

use tests::{FaultLoopConfig, kbs_binary, run_fault_loop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_rollout_three_times_loses_no_ack_and_repeats_no_apply() {
    tests::init_logging();
    let mut config = FaultLoopConfig::new(kbs_binary(), 20, 3);
    // Few guests: slow the pushes so that each kill lands mid-rollout.
    config.max_concurrent = 2;
    config.apply_time = std::time::Duration::from_millis(20);
    let report = run_fault_loop(&config).await.unwrap();
    report.print();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.iterations.len(), 3);
    assert!(
        report.iterations.iter().all(|i| i.killed_mid_rollout),
        "every kill landed with targets acked and pending: {:#?}",
        report.iterations
    );
    assert!(
        report.tunnels_opened >= 20 * 4,
        "the guests reconnected after each kill ({} tunnels)",
        report.tunnels_opened
    );
}
