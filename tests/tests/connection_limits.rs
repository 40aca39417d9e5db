#![allow(clippy::unwrap_used)]
//! issue 17 defect 2, end to end: what an unauthenticated peer may hold of a real KBS, in
//! time (TLS handshake, first bytes, request body) and in number (`http.max_connections`,
//! `http.max_http_connections`), while `/healthz`, RCAR and the tunnel keep working.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tests::{StubGuest, TestKbs, TunnelGuest, WAIT, allow_sample, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time until the KBS closes `stream`, which sends nothing more; `None` if still open
/// after [`WAIT`].
async fn closed_after(stream: &mut TcpStream) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A plain KBS with `first_byte_timeout`, `body_timeout` and `tls_handshake_timeout` at
/// 500 ms.
async fn quick_kbs(tls: bool) -> TestKbs {
    TestKbs::start_with(tls, |c| {
        c.http.first_byte_timeout = Duration::from_millis(500);
        c.http.body_timeout = Duration::from_millis(500);
        c.http.tls_handshake_timeout = Duration::from_millis(500);
    })
    .await
}

/// A socket that sends nothing, or one byte of what could be the HTTP/2 preface, was kept
/// open for ever (still open after 40 s on the release build).
#[tokio::test]
async fn silent_and_one_byte_sockets_are_closed_after_the_first_byte_timeout() {
    let kbs = quick_kbs(false).await;
    for sent in [&b""[..], b"P"] {
        let mut stream = TcpStream::connect(kbs.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let took = closed_after(&mut stream).await;
        let took = took.unwrap_or_else(|| panic!("{sent:?}: still open after {WAIT:?}"));
        assert!(took < Duration::from_secs(3), "{sent:?}: {took:?}");
    }
    assert!(kbs.metric("kbs_connections_timed_out_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_tls_handshake_timeout() {
    let kbs = quick_kbs(true).await;
    let mut stream = TcpStream::connect(kbs.addr).await.unwrap();
    let took = closed_after(&mut stream).await.expect("closed");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A body that stalls is answered `408 RequestTimeout` (before, the handler waited for it
/// for ever).
#[tokio::test]
async fn a_stalled_body_is_a_408() {
    let kbs = quick_kbs(false).await;
    let mut stream = TcpStream::connect(kbs.addr).await.unwrap();
    stream
        .write_all(b"POST /kbs/v0/auth HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"version\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within {WAIT:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert!(
        json["type"]
            .as_str()
            .unwrap_or("")
            .ends_with("/RequestTimeout"),
        "{answer}"
    );
    assert!(
        json["detail"]
            .as_str()
            .unwrap_or("")
            .contains("http.body_timeout"),
        "{answer}"
    );
}

/// 2,000 sockets that send nothing, against a KBS capped at 100 HTTP connections out of
/// 300: the KBS holds at most 100 of them (each newcomer closes the oldest idle one),
/// `/healthz` answers every time, a connected guest keeps its tunnel and a new guest
/// attests and connects.
#[tokio::test]
async fn idle_sockets_cannot_keep_clients_or_guests_out() {
    const FLOOD: usize = 2000;
    let kbs = TestKbs::start_with(false, |c| {
        allow_sample(c);
        // Only the cap may help: the flood is never timed out during the test.
        c.http.first_byte_timeout = Duration::from_secs(600);
        c.http.max_connections = Some(300);
        c.http.max_http_connections = 100;
    })
    .await;
    let info = || tests::guest_info("instance-1", "test-0.1", &["resources"]);
    let (before, _, _) = TunnelGuest::attest_and_dial(&kbs, None, info(), StubGuest::new()).await;

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(kbs.addr).await.unwrap());
    }
    let stats = &kbs.state.connections;
    // A fresh connection per request: each one must win its place from the flood.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let resp = fresh
            .get(format!("{}/healthz", kbs.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("/healthz answers while the flood is held");
        assert_eq!(resp.status(), StatusCode::OK);
        slowest = slowest.max(started.elapsed());
        assert!(stats.http() <= 100, "{}", stats.http());
    }
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");

    let (after, _, _) = TunnelGuest::attest_and_dial(&kbs, None, info(), StubGuest::new()).await;
    assert!(
        !before.served.is_finished(),
        "the first guest's tunnel was closed"
    );
    assert!(!after.served.is_finished());
    assert!(stats.open() <= 300, "{}", stats.open());
    let evicted = stats.evicted();
    assert!(evicted >= (FLOOD - 100) as u64, "{evicted}");
    let metrics = kbs.metrics().await;
    let upgraded = tests::metric_value(&metrics, "kbs_connections_open", &[("kind", "upgraded")]);
    assert_eq!(upgraded, 2.0, "{metrics}");

    // The flood's sockets were closed by the KBS, all but the last ones.
    drop(flood);
    eventually("the flood's places are freed", || async {
        stats.http() <= 2
    })
    .await;
}
