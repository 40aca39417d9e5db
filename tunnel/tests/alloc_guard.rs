//! Cheap guards on the README's memory and latency figures (the benchmarks in examples/ give
//! the figures; these fail on an order-of-magnitude regression): heap held per idle tunnel,
//! and allocations per RPC, counted by an instrumented global allocator in this test binary
//! (both ends of each tunnel live in this process, so the figures cover both).

mod support;

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes held now.
fn held() -> i64 {
    let stats = GLOBAL.stats();
    stats.bytes_allocated as i64 + stats.bytes_reallocated as i64 - stats.bytes_deallocated as i64
}

/// Idle tunnels opened for the measurement.
const TUNNELS: usize = 40;
/// Heap held per idle tunnel, both ends, when this guard was written (31.3 KiB; the KBS end
/// alone is the README's ~8 KiB of RSS, the guest end holds its WebSocket buffers).
const MEASURED_HEAP_PER_TUNNEL: i64 = 31_350;
/// Four times that: far above noise (runs differ by a few bytes), well below a regression
/// such as a 128 KiB buffer per tunnel.
const MAX_HEAP_PER_TUNNEL: i64 = 4 * MEASURED_HEAP_PER_TUNNEL;

#[tokio::test(flavor = "current_thread")]
async fn an_idle_tunnel_holds_little_heap_and_an_rpc_allocates_little() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        // Warm up: lazily built state (the router, pools, the first tunnel's paths).
        let (warm, warm_serving) = kbs.guest("warm", TestService::default()).await;
        let warm_handle = kbs.registered("warm").await;
        for _ in 0..50 {
            assert_echoes(&warm_handle, &[5; 64]).await;
        }

        let before = held();
        let mut guests = Vec::new();
        for n in 0..TUNNELS {
            let id = format!("g{n}");
            guests.push(kbs.guest(&id, TestService::default()).await);
            kbs.registered(&id).await;
        }
        let per_tunnel = (held() - before) / TUNNELS as i64;
        assert!(per_tunnel > 0, "the measurement saw the tunnels: {per_tunnel}");
        assert!(
            per_tunnel < MAX_HEAP_PER_TUNNEL,
            "an idle tunnel (both ends) holds {per_tunnel} bytes of heap; the guard is {MAX_HEAP_PER_TUNNEL}"
        );

        // Allocations per ping round trip (KBS call, frames both ways, guest dispatch).
        const PINGS: u64 = 500;
        let region = Region::new(GLOBAL);
        for _ in 0..PINGS {
            assert_echoes(&warm_handle, &[7; 64]).await;
        }
        let per_rpc = region.change().allocations as u64 / PINGS;
        assert!(per_rpc > 0, "the measurement saw the pings");
        assert!(
            per_rpc < MAX_ALLOCS_PER_RPC,
            "a ping round trip makes {per_rpc} allocations; the guard is {MAX_ALLOCS_PER_RPC}"
        );
        eprintln!("heap per idle tunnel {per_tunnel} B, allocations per RPC {per_rpc}");

        for (session, serving) in guests {
            session.close();
            serving.await.expect("guest task");
        }
        warm.close();
        warm_serving.await.expect("guest task");
    })
    .await;
}

/// Allocations per ping round trip (both ends) when this guard was written.
const MEASURED_ALLOCS_PER_RPC: u64 = 12;
/// Four times that.
const MAX_ALLOCS_PER_RPC: u64 = 4 * MEASURED_ALLOCS_PER_RPC;
