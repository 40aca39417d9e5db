//! Tunnel benchmark on loopback, in one process, plain WebSocket or TLS (`--tls`): RPC `ping`
//! latency against a raw WebSocket echo over the same stack (same buffers, same TLS),
//! pipelined throughput on one tunnel, and total throughput across many tunnels. The machine
//! drifts, so the baselines are measured in the same run and the figures are printed as
//! ratios too (see docs/operations.md, "Raw WebSocket floor").
//!
//! The handshake uses the test kit's fake challenge (`tests::FakeTunnelKbs`): no crypto is
//! measured.
//!
//! Layouts: by default the guests (and the guest end of the raw echo) run on a current-thread
//! runtime of their own, as `guest-daemon` does, and both figures are measured from the KBS's
//! runtime on the KBS's axum socket. `--current-thread` puts everything on one thread (the
//! CPU cost alone, no wake-ups across threads); `--shared-runtime` puts the guests on the
//! KBS's runtime (the layout of runs before 2026-12-06).
//!
//! ```sh
//! cargo run --release -p examples --example tunnel_bench
//! cargo run --release -p examples --example tunnel_bench -- --tls
//! cargo run --release -p examples --example tunnel_bench -- --current-thread
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use axum::{
    Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{Message as AxumMessage, WebSocket},
    },
    response::Response,
    routing::any,
};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use tests::{FakeKbsOptions, FakeTunnelKbs, StubGuest, fake_token, fake_unseal};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tunnel::{GuestTunnelConfig, TunnelHandle, TunnelLimits};

/// Tunnel benchmark (loopback, plain WebSocket).
#[derive(Parser, Debug)]
struct Args {
    /// Payload size, bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Sequential calls measured for latency (after as many warm-up calls / 5).
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Calls in flight on the single-tunnel throughput run.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Tunnels in the many-tunnel throughput run.
    #[arg(long, default_value_t = 1000)]
    tunnels: usize,
    /// Calls in flight per tunnel in the many-tunnel run.
    #[arg(long, default_value_t = 4)]
    per_tunnel: usize,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Serve over TLS 1.3 (self-signed certificate, ring provider) instead of plain TCP.
    #[arg(long)]
    tls: bool,
    /// Interleaved latency rounds (raw echo, then RPC, each `calls / rounds` calls); the
    /// median of the per-round ratios resists the machine's drift better than one long run.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Run everything on one thread (tokio's current-thread runtime): the one-core floor,
    /// without the cost of waking tasks across runtime workers.
    #[arg(long)]
    current_thread: bool,
    /// Run the simulated guests (and the raw echo's client) on the KBS's own runtime instead
    /// of a guest runtime of their own (the layout of earlier runs; see `GuestRuntime`).
    #[arg(long)]
    shared_runtime: bool,
    /// KBS-side WebSocket read buffer, bytes (default: the tunnel's default).
    #[arg(long)]
    kbs_read_buffer: Option<usize>,
}

/// Where the guest side runs. A real guest daemon is another process (another machine) with
/// its own single-threaded runtime (`guest-daemon` uses tokio's current-thread runtime), so by
/// default the bench gives the guests such a runtime on a thread of their own: the KBS's two
/// workers then schedule only the KBS side, as in production. The raw echo's client runs there
/// too, so both figures cross the same runtime boundary once each way.
#[derive(Clone)]
struct GuestRuntime {
    handle: tokio::runtime::Handle,
}

impl GuestRuntime {
    /// A current-thread runtime on its own thread (kept for the process's life).
    fn own() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("guest-runtime".into())
            .spawn(move || runtime.block_on(futures::future::pending::<()>()))?;
        Ok(Self { handle })
    }

    /// The caller's runtime.
    fn shared() -> Self {
        Self {
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `fut` on the guest runtime and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.handle.spawn(fut).await?
    }
}

/// Upgraded `/echo` sockets go to the bench (the KBS side of the raw echo).
#[derive(Clone)]
struct EchoState {
    sockets: tokio::sync::mpsc::Sender<WebSocket>,
    limits: TunnelLimits,
}

/// Raw echo route: same buffer sizes as the tunnel route; the upgraded socket goes to the
/// bench, which measures from the KBS side as the RPC does.
async fn echo_route(State(state): State<EchoState>, ws: WebSocketUpgrade) -> Response {
    ws.read_buffer_size(state.limits.read_buffer_size)
        .write_buffer_size(state.limits.write_buffer_size)
        .on_upgrade(move |socket| async move {
            let _ = state.sockets.send(socket).await;
        })
}

/// The tunnel-only KBS (fake token and challenge: no crypto is measured) with a raw echo
/// route beside the tunnel.
struct Kbs {
    fake: FakeTunnelKbs,
    guest: GuestRuntime,
    echo_sockets: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<WebSocket>>,
    limits: TunnelLimits,
}

async fn start_kbs(
    tls: bool,
    guest: GuestRuntime,
    read_buffer: Option<usize>,
) -> anyhow::Result<Kbs> {
    let mut limits = TunnelLimits::default();
    if let Some(size) = read_buffer {
        limits.read_buffer_size = size;
    }
    let (echo_tx, echo_rx) = tokio::sync::mpsc::channel(1);
    let echo = Router::new()
        .route("/echo", any(echo_route))
        .with_state(EchoState {
            sockets: echo_tx,
            limits: limits.clone(),
        });
    let fake = FakeTunnelKbs::start(FakeKbsOptions {
        tls,
        limits: limits.clone(),
        routes: echo,
        ..FakeKbsOptions::default()
    })
    .await?;
    Ok(Kbs {
        fake,
        guest,
        echo_sockets: tokio::sync::Mutex::new(echo_rx),
        limits,
    })
}

/// Opens a tunnel as guest `id` on the guest runtime, serves the default stub (`ping`
/// echoes) on a task there, and returns the KBS handle.
async fn open_tunnel(kbs: &Kbs, id: &str) -> anyhow::Result<Arc<TunnelHandle>> {
    let config = kbs.fake.guest_config();
    let guest_id = id.to_owned();
    kbs.guest
        .run(async move {
            let (_session, serving) = tunnel::connect_and_serve(
                &config,
                &fake_token(&guest_id),
                tests::guest_info(&guest_id, "bench", &[]),
                fake_unseal,
                StubGuest::new(),
            )
            .await
            .with_context(|| format!("connect {guest_id}"))?;
            tokio::spawn(serving);
            Ok(())
        })
        .await?;
    Ok(tests::tunnel_of(&kbs.fake.hub, Duration::from_secs(10), id, |_| true).await)
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> Latency {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(i).copied().unwrap_or_default()
    };
    Latency {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn rpc_samples(
    handle: &TunnelHandle,
    payload: &[u8],
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..calls / 5 {
        handle.ping(payload.to_vec(), None).await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let body = payload.to_vec();
        let start = Instant::now();
        let back = handle.ping(body, None).await?;
        samples.push(start.elapsed());
        if back.len() != payload.len() {
            bail!("ping echoed {} bytes, sent {}", back.len(), payload.len());
        }
    }
    Ok(samples)
}

fn client_ws_config() -> WebSocketConfig {
    // The guest's defaults (GuestTunnelConfig::new): 4 KiB read, 8 KiB write buffer.
    let guest = GuestTunnelConfig::new("ws://unused");
    WebSocketConfig::default()
        .read_buffer_size(guest.read_buffer_size)
        .write_buffer_size(guest.write_buffer_size)
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The guest end of a raw echo: dials `/echo` with the guest's WebSocket configuration (as
/// the tunnel does) and sends every binary message back until the KBS closes.
async fn raw_echo_guest(url: String, tls: Option<Arc<rustls::ClientConfig>>) -> anyhow::Result<()> {
    let (mut ws, _): (RawWs, _) = tokio_tungstenite::connect_async_tls_with_config(
        url,
        Some(client_ws_config()),
        true,
        tls.map(tokio_tungstenite::Connector::Rustls),
    )
    .await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(b) => ws.send(Message::Binary(b)).await?,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// A raw echo connection: the guest end runs on the guest runtime, the KBS end (the axum
/// socket, same buffers as a tunnel) is returned to measure from the KBS runtime.
async fn raw_echo_connect(kbs: &Kbs) -> anyhow::Result<WebSocket> {
    let (url, tls) = (kbs.fake.ws_url("/echo"), kbs.fake.client_tls.clone());
    kbs.guest.handle.spawn(async move {
        if let Err(e) = raw_echo_guest(url, tls).await {
            eprintln!("raw echo guest: {e:#}");
        }
    });
    let mut sockets = kbs.echo_sockets.lock().await;
    tokio::time::timeout(Duration::from_secs(10), sockets.recv())
        .await
        .context("raw echo connection timed out")?
        .context("raw echo route gone")
}

/// Waits for the next binary message on the KBS end of a raw echo.
async fn next_binary<S>(ws: &mut S) -> anyhow::Result<usize>
where
    S: futures::Stream<Item = Result<AxumMessage, axum::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(AxumMessage::Binary(b))) => return Ok(b.len()),
            Some(Ok(AxumMessage::Ping(_) | AxumMessage::Pong(_))) => {}
            Some(Ok(other)) => bail!("unexpected echo message {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("echo stream ended"),
        }
    }
}

async fn raw_echo_samples(
    kbs: &Kbs,
    payload: &[u8],
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut ws = raw_echo_connect(kbs).await?;
    let payload = tokio_tungstenite::tungstenite::Bytes::copy_from_slice(payload);
    for _ in 0..calls / 5 {
        ws.send(AxumMessage::Binary(payload.clone())).await?;
        next_binary(&mut ws).await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        ws.send(AxumMessage::Binary(payload.clone())).await?;
        next_binary(&mut ws).await?;
        samples.push(start.elapsed());
    }
    close_echo(ws).await;
    Ok(samples)
}

/// Raw echo, `in_flight` messages outstanding, for `seconds`: messages per second.
async fn raw_echo_throughput(
    kbs: &Kbs,
    payload: &[u8],
    in_flight: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let ws = raw_echo_connect(kbs).await?;
    let (mut tx, mut rx) = ws.split();
    let window = Arc::new(Semaphore::new(in_flight));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = tokio_tungstenite::tungstenite::Bytes::copy_from_slice(payload);
    let writer = {
        let (window, stop) = (window.clone(), stop.clone());
        tokio::spawn(async move {
            // Send as many as the window allows, then flush once (batched writes).
            'outer: while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                let mut batch = 1;
                while let Ok(permit) = window.try_acquire() {
                    permit.forget();
                    batch += 1;
                }
                for _ in 0..batch {
                    if tx.feed(AxumMessage::Binary(payload.clone())).await.is_err() {
                        break 'outer;
                    }
                }
                if tx.flush().await.is_err() {
                    break;
                }
            }
            let _ = tx.flush().await;
            tx
        })
    };
    let duration = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut received = 0u64;
    while start.elapsed() < duration {
        match tokio::time::timeout(Duration::from_secs(5), next_binary(&mut rx)).await {
            Ok(Ok(_)) => {
                received += 1;
                window.add_permits(1);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("raw echo stalled"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    window.close();
    if let Ok(tx) = writer.await
        && let Ok(ws) = tx.reunite(rx)
    {
        close_echo(ws).await;
    }
    Ok(received as f64 / elapsed)
}

/// Closes the KBS end of a raw echo and waits for the guest's close (messages still in
/// flight are read and dropped), so neither end sees a reset.
async fn close_echo(mut ws: WebSocket) {
    let _ = ws.send(AxumMessage::Close(None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// `workers` tasks per handle, each calling `ping` back to back for `seconds`.
/// Returns (calls per second, errors).
async fn rpc_throughput(
    handles: &[Arc<TunnelHandle>],
    workers: usize,
    payload: &[u8],
    seconds: f64,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(handles.len() * workers);
    for handle in handles {
        for _ in 0..workers {
            let (handle, done, errors, stop) =
                (handle.clone(), done.clone(), errors.clone(), stop.clone());
            let payload = payload.to_vec();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match handle.ping(payload.clone(), None).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    // Let the pipeline fill, then count over the window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let (elapsed, after) = (start.elapsed().as_secs_f64(), done.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    (
        (after - before) as f64 / elapsed,
        errors.load(Ordering::Relaxed),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let guest = if args.shared_runtime || args.current_thread {
        GuestRuntime::shared()
    } else {
        GuestRuntime::own()?
    };
    let kbs = Arc::new(start_kbs(args.tls, guest, args.kbs_read_buffer).await?);
    let payload = vec![0xa5u8; args.payload];
    let workers = if args.current_thread {
        1
    } else {
        std::thread::available_parallelism().map_or(0, |n| n.get())
    };
    println!(
        "tunnel_bench: loopback, {} WebSocket, {} B payload, KBS runtime {workers} workers, \
         guests {}, KBS buffers {} B read / {} KiB write, guest buffers {} KiB read / {} KiB write",
        if args.tls { "TLS 1.3" } else { "plain" },
        args.payload,
        if args.shared_runtime || args.current_thread {
            "on the KBS runtime"
        } else {
            "on their own current-thread runtime"
        },
        kbs.limits.read_buffer_size,
        kbs.limits.write_buffer_size / 1024,
        client_ws_config().read_buffer_size / 1024,
        client_ws_config().write_buffer_size / 1024,
    );

    // 1. Latency: interleaved rounds, each raw echo then RPC on the same connections.
    let handle = open_tunnel(&kbs, "bench-0").await?;
    let rounds = args.rounds.max(1);
    let per_round = (args.calls / rounds).max(100);
    let mut echo_all = Vec::new();
    let mut rpc_all = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let echo = {
            let (kbs, payload) = (kbs.clone(), payload.clone());
            tokio::spawn(async move { raw_echo_samples(&kbs, &payload, per_round).await }).await??
        };
        let rpc = {
            let (handle, payload) = (handle.clone(), payload.clone());
            tokio::spawn(async move { rpc_samples(&handle, &payload, per_round).await }).await??
        };
        let (e, r) = (percentiles(echo.clone()), percentiles(rpc.clone()));
        ratios.push(us(r.p50) / us(e.p50).max(1e-3));
        echo_all.extend(echo);
        rpc_all.extend(rpc);
    }
    ratios.sort_by(f64::total_cmp);
    let median_ratio = ratios[ratios.len() / 2];
    let (echo, rpc) = (percentiles(echo_all), percentiles(rpc_all));
    println!();
    println!(
        "1. latency, {rounds} interleaved rounds of {per_round} sequential calls each (after warm-up)"
    );
    println!(
        "   raw WebSocket echo     p50 {:7.1} us  p99 {:7.1} us   (docs/operations.md floor: 38 / 74 us plain, 42 / 81 us TLS)",
        us(echo.p50),
        us(echo.p99)
    );
    println!(
        "   tunnel RPC ping        p50 {:7.1} us  p99 {:7.1} us",
        us(rpc.p50),
        us(rpc.p99)
    );
    println!(
        "   ratio RPC / raw echo   p50 {:.2}x overall, {median_ratio:.2}x median of rounds (min {:.2}x, max {:.2}x)  p99 {:.2}x   (target p50 <= 1.5x: {})",
        us(rpc.p50) / us(echo.p50).max(1e-3),
        ratios[0],
        ratios[ratios.len() - 1],
        us(rpc.p99) / us(echo.p99).max(1e-3),
        if median_ratio <= 1.5 {
            "met"
        } else {
            "NOT met"
        }
    );
    if echo.p50 > rpc.p50 {
        println!(
            "   note: the raw echo is slower than the RPC, so thread wake-ups (idle vCPUs) dominate \
             both figures, not the work per call; `--current-thread` measures the CPU cost alone"
        );
    }

    // 2. Throughput.
    let raw_tp = raw_echo_throughput(&kbs, &payload, args.in_flight, args.seconds).await?;
    let (one_tp, one_err) = rpc_throughput(
        std::slice::from_ref(&handle),
        args.in_flight,
        &payload,
        args.seconds,
    )
    .await;
    println!();
    println!(
        "2. throughput, {} in flight, {:.1} s",
        args.in_flight, args.seconds
    );
    println!(
        "   raw WebSocket echo     {raw_tp:10.0} msg/s     (docs/operations.md floor: ~890k msg/s plain, ~720k TLS)"
    );
    println!(
        "   tunnel RPC, 1 tunnel   {one_tp:10.0} calls/s   errors {one_err}   (target >= 50,000/s: {})",
        if one_tp >= 50_000.0 { "met" } else { "NOT met" }
    );
    println!("   ratio RPC / raw echo   {:.3}", one_tp / raw_tp.max(1.0));

    let open_start = Instant::now();
    let mut handles = futures::stream::iter(0..args.tunnels)
        .map(|i| {
            let kbs = &kbs;
            async move { open_tunnel(kbs, &format!("fleet-{i}")).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let open_secs = open_start.elapsed().as_secs_f64();
    handles.sort_by(|a, b| a.guest_id.cmp(&b.guest_id));
    let (many_tp, many_err) =
        rpc_throughput(&handles, args.per_tunnel, &payload, args.seconds).await;
    println!(
        "   {} tunnels opened in {open_secs:.2} s ({:.0}/s, fake challenge, 64 at a time)",
        handles.len(),
        handles.len() as f64 / open_secs
    );
    println!(
        "   tunnel RPC, {} tunnels x {} in flight: {many_tp:10.0} calls/s total   errors {many_err}   ({:.2}x the 1-tunnel figure)",
        handles.len(),
        args.per_tunnel,
        many_tp / one_tp.max(1.0)
    );
    Ok(())
}
