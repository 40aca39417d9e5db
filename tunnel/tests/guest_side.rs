//! The guest end against a scripted fake KBS (raw tokio-tungstenite server on loopback).

mod support;

use std::time::Duration;

use futures::SinkExt;
use rpc_defs::{Frame, PROTOCOL_VERSION, SUBPROTOCOL};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::server::{Request, Response},
        http::HeaderValue,
    },
};
use tunnel::{ConnectError, GuestTunnelConfig, connect, handshake::HandshakeError};

type ServerWs = WebSocketStream<TcpStream>;

/// Accepts one WebSocket on `listener`, selecting `tether.v1` when `select` is true.
#[allow(clippy::result_large_err)] // the callback's error type is tungstenite's
async fn accept(listener: &TcpListener, select: bool) -> ServerWs {
    let (tcp, _) = listener.accept().await.expect("accept");
    tokio_tungstenite::accept_hdr_async(tcp, move |_: &Request, mut resp: Response| {
        if select {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        Ok(resp)
    })
    .await
    .expect("upgrade")
}

/// Plays the server's side of the handshake with the fake crypto.
async fn welcome(ws: &mut ServerWs, heartbeat_s: u32) {
    let nonce = [9_u8; 32];
    ws.send(encode_frame(&Frame::Hello {
        version: PROTOCOL_VERSION,
        challenge: nonce.iter().map(|b| b ^ XOR).collect(),
        heartbeat_s,
        max_frame: 1 << 20,
    }))
    .await
    .expect("hello");
    let Frame::Proof { nonce: got, .. } = read_frame(ws).await else {
        panic!("expected proof");
    };
    assert_eq!(got, nonce);
    ws.send(encode_frame(&Frame::Welcome {
        session_id: "s".into(),
        guest_id: "g".into(),
        reauth_before: unix_now() + 3600,
    }))
    .await
    .expect("welcome");
}

fn encode_frame(frame: &Frame) -> Message {
    Message::Binary(tunnel::frame::encode(frame).expect("encode").into())
}

async fn listener() -> (TcpListener, GuestTunnelConfig) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "ws://{}/kbs/v0/tunnel",
        listener.local_addr().expect("addr")
    );
    (listener, GuestTunnelConfig::new(url))
}

// Paused time: the clock only moves when every task waits, so the give-up time is the
// liveness rule's, not the machine's load.
#[tokio::test(start_paused = true)]
async fn guest_gives_up_on_a_silent_server_with_4408() {
    within(async {
        let (listener, config) = listener().await;
        let server = tokio::spawn(async move {
            let mut ws = accept(&listener, true).await;
            welcome(&mut ws, 1).await;
            // Never ping; just wait for the guest's close.
            read_close_code(&mut ws).await
        });
        let tunnel = connect(&config, "t", info("g"), unseal)
            .await
            .expect("connect");
        assert_eq!(tunnel.welcome().heartbeat_s, 1);
        let started = tokio::time::Instant::now();
        let closed = tunnel.serve(TestService::default()).await;
        assert_eq!(closed.close.code, 4408, "{closed:?}");
        assert!(!closed.close.by_peer);
        // Three heartbeats of silence (heartbeat_s = 1), to the tick.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_millis(3100),
            "{waited:?}"
        );
        assert_eq!(server.await.expect("server"), Some(4408));
    })
    .await;
}

#[tokio::test]
async fn guest_closes_4400_on_an_unexpected_frame() {
    within(async {
        let (listener, config) = listener().await;
        let server = tokio::spawn(async move {
            let mut ws = accept(&listener, true).await;
            welcome(&mut ws, 20).await;
            ws.send(encode_frame(&Frame::Welcome {
                session_id: "again".into(),
                guest_id: "g".into(),
                reauth_before: 0,
            }))
            .await
            .expect("send");
            read_close_code(&mut ws).await
        });
        let tunnel = connect(&config, "t", info("g"), unseal)
            .await
            .expect("connect");
        let closed = tunnel.serve(TestService::default()).await;
        assert_eq!(closed.close.code, 4400);
        assert_eq!(server.await.expect("server"), Some(4400));
    })
    .await;
}

#[tokio::test]
async fn guest_refuses_another_protocol_version() {
    within(async {
        let (listener, config) = listener().await;
        let server = tokio::spawn(async move {
            let mut ws = accept(&listener, true).await;
            ws.send(encode_frame(&Frame::Hello {
                version: PROTOCOL_VERSION + 1,
                challenge: vec![],
                heartbeat_s: 20,
                max_frame: 1 << 20,
            }))
            .await
            .expect("hello");
            read_close_code(&mut ws).await
        });
        let err = connect(&config, "t", info("g"), unseal)
            .await
            .expect_err("accepted version 2");
        assert!(
            matches!(err, ConnectError::Handshake(HandshakeError::Version(2))),
            "{err:?}"
        );
        assert!(!err.needs_reattest());
        assert_eq!(server.await.expect("server"), Some(4400));
    })
    .await;
}

#[tokio::test]
async fn guest_requires_the_subprotocol() {
    within(async {
        let (listener, config) = listener().await;
        let server = tokio::spawn(async move {
            let mut ws = accept(&listener, false).await;
            read_close_code(&mut ws).await
        });
        let err = connect(&config, "t", info("g"), unseal)
            .await
            .expect_err("connected without the subprotocol");
        // tungstenite refuses the upgrade itself, or we close with 4400 after it.
        assert!(
            matches!(err, ConnectError::Subprotocol | ConnectError::Connect(_)),
            "{err:?}"
        );
        let _ = server.await;
    })
    .await;
}

#[tokio::test]
async fn handshake_times_out_when_the_server_says_nothing() {
    within(async {
        let (listener, mut config) = listener().await;
        config.handshake_timeout = Duration::from_millis(200);
        let server = tokio::spawn(async move {
            let mut ws = accept(&listener, true).await;
            read_close_code(&mut ws).await
        });
        let err = connect(&config, "t", info("g"), unseal)
            .await
            .expect_err("no hello, yet connected");
        assert!(matches!(err, ConnectError::HandshakeTimeout), "{err:?}");
        assert_eq!(server.await.expect("server"), Some(4408));
    })
    .await;
}
