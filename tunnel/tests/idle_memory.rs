//! Idle memory per tunnel, measured as resident-set growth (run by hand:
//! `cargo test -p tunnel --release --test idle_memory -- --ignored --nocapture`).
//! Both ends live in this process, so the figure is KBS side plus guest side.

mod support;

use std::time::Duration;

use support::*;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn idle_memory_per_tunnel() {
    const N: usize = 2000;
    let kbs = TestKbs::start(KbsOptions::default()).await;
    // Warm up allocator arenas and lazily initialised statics.
    let mut sessions = Vec::new();
    for i in 0..50 {
        sessions.push(kbs.guest(&format!("g{i}"), TestService::default()).await);
    }
    kbs.wait_for_tunnels(50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    for i in 50..N + 50 {
        sessions.push(kbs.guest(&format!("g{i}"), TestService::default()).await);
    }
    kbs.wait_for_tunnels(N + 50).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / N as f64 / 1024.0;
    println!("idle RSS per tunnel (KBS + guest ends): {per:.1} KiB over {N} tunnels");
    for (session, _) in &sessions {
        session.close();
    }
    for (_, serving) in sessions {
        let _ = serving.await;
    }
    kbs.wait_for_tunnels(0).await;
}

/// The KBS end alone: tunnels from bare WebSocket clients (4 KiB buffers) that only do the
/// handshake; a bare client costs about what docs/operations.md ("Raw WebSocket floor") gives. Run it in its own
/// process (filter by name): freed memory from another test would hide the growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn idle_memory_kbs_end() {
    const N: usize = 2000;
    let kbs = TestKbs::start(KbsOptions::default()).await;
    let mut raws = Vec::new();
    for i in 0..50 {
        let mut ws = raw_connect_with(&kbs.url(), &format!("good:w{i}"), Some(small())).await;
        let _ = raw_handshake(&mut ws, true).await;
        raws.push(ws);
    }
    kbs.wait_for_tunnels(50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    for i in 0..N {
        let mut ws = raw_connect_with(&kbs.url(), &format!("good:r{i}"), Some(small())).await;
        let _ = raw_handshake(&mut ws, true).await;
        raws.push(ws);
    }
    kbs.wait_for_tunnels(N + 50).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / N as f64 / 1024.0;
    println!("idle RSS per tunnel (KBS end + bare 4 KiB client): {per:.1} KiB over {N} tunnels");
    drop(raws);
    kbs.wait_for_tunnels(0).await;
}

fn small() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192)
}
