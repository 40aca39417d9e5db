//! Tunnel behaviour over real sockets on loopback: a tiny axum KBS calling
//! `serve_guest_tunnel`, guests using `connect`/`connect_and_serve`, and raw WebSocket
//! clients misbehaving on purpose.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures::SinkExt;
use rpc_defs::{CloseCode, Frame, GuestError, ProbeKind, SealedResource};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tunnel::{CallError, ConnectError, TunnelLimits, connect};

#[tokio::test]
async fn ping_probe_and_push_round_trip_then_hub_empties() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let (session, serving) = kbs.guest("g1", TestService::default()).await;
        let handle = kbs.registered("g1").await;
        assert_eq!(handle.guest_id, "g1");
        assert_eq!(handle.session_id, session.session_id());
        assert_eq!(handle.instance_id, "g1");
        assert_eq!(handle.labels.get("app").map(String::as_str), Some("test"));
        assert_eq!(session.guest_id(), "g1");

        assert_echoes(&handle, b"hello").await;
        let report = handle.probe(ProbeKind::Health, None).await.expect("probe");
        assert!(report.health.expect("health").healthy);
        let applied = handle
            .apply_resource(
                SealedResource {
                    uri: "repo/key/1".into(),
                    version: 3,
                    jwe: b"{}".to_vec(),
                    sha256: "ab".into(),
                },
                None,
            )
            .await
            .expect("apply");
        assert_eq!(applied.version, 3);
        let refused = handle
            .apply_resource(
                SealedResource {
                    uri: "repo/key/1".into(),
                    version: 0,
                    jwe: vec![],
                    sha256: String::new(),
                },
                None,
            )
            .await;
        assert_eq!(
            refused,
            Err(CallError::Guest(GuestError::Invalid("version 0".into())))
        );
        assert!(handle.last_seen_unix_ms() > 0);

        session.close();
        let closed = serving.await.expect("serve task");
        assert_eq!(closed.close.code, 1000);
        assert!(!closed.close.by_peer);
        kbs.wait_for_tunnels(0).await;
        assert_eq!(kbs.observer.handshake_outcomes(), ["ok"]);
        assert_eq!(kbs.observer.disconnect_codes(), [1000]);
        assert!(
            kbs.observer
                .rpc_outcomes()
                .contains(&("apply_resource", "guest_error"))
        );
        // Calls on a handle whose tunnel ended fail fast.
        assert_eq!(
            handle.ping(vec![], None).await,
            Err(CallError::Disconnected)
        );
    })
    .await;
}

#[tokio::test]
async fn deadline_fires_on_a_silent_guest_and_the_tunnel_stays_usable() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let service = TestService::default();
        let (_session, _serving) = kbs.guest("g1", service.clone()).await;
        let handle = kbs.registered("g1").await;

        let started = tokio::time::Instant::now();
        let err = handle
            .ping(b"hang".to_vec(), Some(Duration::from_millis(200)))
            .await
            .expect_err("hang answered");
        assert_eq!(err, CallError::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_secs(2));
        // The guest aborts the handler at the same deadline.
        wait_until(|| service.active.load(Ordering::SeqCst) == 0).await;

        assert_echoes(&handle, b"again").await;
        assert!(
            kbs.observer
                .rpc_outcomes()
                .contains(&("ping", "deadline_exceeded"))
        );
        assert_eq!(handle.in_flight(), 0);
    })
    .await;
}

#[tokio::test]
async fn dropping_a_call_cancels_it_on_the_guest() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let service = TestService::default();
        let (_session, _serving) = kbs.guest("g1", service.clone()).await;
        let handle = kbs.registered("g1").await;

        let h = handle.clone();
        let call = tokio::spawn(async move { h.ping(b"hang".to_vec(), None).await });
        wait_until(|| service.active.load(Ordering::SeqCst) == 1).await;
        call.abort();
        let _ = call.await;
        wait_until(|| service.active.load(Ordering::SeqCst) == 0).await;
        assert!(kbs.observer.rpc_outcomes().contains(&("ping", "cancelled")));
        assert_echoes(&handle, b"ok").await;
    })
    .await;
}

#[tokio::test]
async fn kbs_refuses_calls_beyond_the_in_flight_limit() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            max_in_flight: 2,
            ..TunnelLimits::default()
        })
        .await;
        let service = TestService::default();
        let (_session, _serving) = kbs.guest("g1", service.clone()).await;
        let handle = kbs.registered("g1").await;

        let mut calls = Vec::new();
        for _ in 0..2 {
            let h = handle.clone();
            calls.push(tokio::spawn(async move {
                h.ping(b"hang".to_vec(), Some(Duration::from_secs(30)))
                    .await
            }));
        }
        wait_until(|| service.active.load(Ordering::SeqCst) == 2).await;
        assert_eq!(handle.in_flight(), 2);
        assert_eq!(
            handle.ping(b"one more".to_vec(), None).await,
            Err(CallError::TooManyInFlight)
        );
        for call in calls {
            call.abort();
        }
        wait_until(|| handle.in_flight() == 0).await;
        assert_echoes(&handle, b"ok").await;
    })
    .await;
}

#[tokio::test]
async fn guest_throttles_requests_beyond_its_own_limit() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let mut config = kbs.guest_config();
        config.max_concurrent_requests = 1;
        let service = TestService::default();
        let (_session, _serving) = kbs.guest_with(config, "g1", service.clone()).await;
        let handle = kbs.registered("g1").await;

        let h = handle.clone();
        let first = tokio::spawn(async move { h.ping(b"slow".to_vec(), None).await });
        wait_until(|| service.active.load(Ordering::SeqCst) == 1).await;
        assert_eq!(
            handle.ping(b"second".to_vec(), None).await,
            Err(CallError::TooManyInFlight)
        );
        assert_eq!(first.await.expect("join").expect("first"), b"slow");
        // The tunnel survives throttling.
        assert_echoes(&handle, b"ok").await;
    })
    .await;
}

#[tokio::test]
async fn oversize_argument_fails_only_its_call() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            max_frame: 64 * 1024,
            ..TunnelLimits::default()
        })
        .await;
        let (_session, _serving) = kbs.guest("g1", TestService::default()).await;
        let handle = kbs.registered("g1").await;
        let err = handle
            .ping(vec![0; 100 * 1024], None)
            .await
            .expect_err("oversize sent");
        assert!(matches!(err, CallError::Transport(_)), "{err:?}");
        assert_echoes(&handle, b"ok").await;
    })
    .await;
}

#[tokio::test]
async fn guests_send_smaller_frames_than_the_kbs() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            max_frame: 256 * 1024,
            max_guest_frame: 16 * 1024,
            ..TunnelLimits::default()
        })
        .await;
        // The Hello announces the guest's limit, not the KBS's.
        let mut ws = raw_connect(&kbs.url(), "good:raw").await;
        let Frame::Hello { max_frame, .. } = read_frame(&mut ws).await else {
            panic!("no hello");
        };
        assert_eq!(max_frame, 16 * 1024);
        drop(ws);

        // A guest frame over its limit closes the tunnel with 4413.
        let code = close_code_after(&kbs, Message::Binary(vec![0_u8; 20 * 1024].into())).await;
        assert_eq!(code, Some(4413));
        kbs.wait_for_tunnels(0).await;

        let (session, _serving) = kbs.guest("g1", TestService::default()).await;
        kbs.wait_for_tunnels(1).await;
        // A token over the guest's limit is refused locally rather than sent into a 4413.
        let err = session
            .reauth(format!("good:g1-{}", "x".repeat(20 * 1024)))
            .await
            .expect_err("oversized token sent");
        assert!(
            matches!(
                err,
                tunnel::ReauthError::Frame(tunnel::frame::CodecError::TooLarge { max, .. }) if max == 16 * 1024
            ),
            "{err:?}"
        );
        assert_eq!(kbs.reauth_calls.load(Ordering::SeqCst), 0);
        let handle = kbs.hub.get("g1").expect("registered");
        // 100 KiB reaches the guest; its 100 KiB echo is over the guest's limit, so the guest
        // answers with an error instead, and the tunnel stays up.
        let err = handle
            .ping(vec![7; 100 * 1024], None)
            .await
            .expect_err("echo over the guest limit");
        assert!(
            matches!(&err, CallError::Transport(why) if why.contains("exceeds")),
            "{err:?}"
        );
        assert_eq!(
            handle
                .ping(vec![1; 8 * 1024], None)
                .await
                .expect("ping")
                .len(),
            8 * 1024
        );
    })
    .await;
}

/// Connects a raw client, completes the handshake, sends `bad`, returns the close code.
async fn close_code_after(kbs: &TestKbs, bad: Message) -> Option<u16> {
    let mut ws = kbs.raw_tunnel().await;
    ws.send(bad).await.expect("send");
    read_close_code(&mut ws).await
}

#[tokio::test]
async fn protocol_violations_get_their_close_codes() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            max_frame: 64 * 1024,
            ..TunnelLimits::default()
        })
        .await;
        let cases = [
            (
                "garbage cbor",
                Message::Binary(vec![0xff, 0x00, 0x13].into()),
                4400,
            ),
            ("text frame", Message::Text("hello".into()), 4400),
            (
                "oversize frame",
                Message::Binary(vec![0_u8; 100 * 1024].into()),
                4413,
            ),
            (
                "unexpected frame",
                encode(&Frame::GoAway {
                    reconnect_after_ms: 1,
                }),
                4400,
            ),
            ("rpc garbage", encode(&Frame::Rpc(vec![1, 2, 3])), 4400),
            (
                "answer nobody asked for",
                Message::Binary(
                    tunnel::frame::encode_rpc(
                        &tarpc::Response::<rpc_defs::GuestServiceResponse> {
                            request_id: 99,
                            message: Ok(rpc_defs::GuestServiceResponse::Ping(
                                serde_bytes::ByteBuf::new(),
                            )),
                        },
                        1 << 20,
                    )
                    .expect("encode")
                    .into(),
                ),
                4400,
            ),
        ];
        for (name, bad, want) in cases {
            let code = close_code_after(&kbs, bad).await;
            assert_eq!(code, Some(want), "{name}");
            kbs.wait_for_tunnels(0).await;
        }
        assert_eq!(
            kbs.observer.disconnect_codes(),
            [4400, 4400, 4413, 4400, 4400, 4400]
        );
    })
    .await;
}

#[tokio::test]
async fn oversize_and_garbage_during_the_handshake() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            max_frame: 64 * 1024,
            ..TunnelLimits::default()
        })
        .await;
        let mut ws = raw_connect(&kbs.url(), "good:raw").await;
        assert!(matches!(read_frame(&mut ws).await, Frame::Hello { .. }));
        ws.send(Message::Binary(vec![0_u8; 100 * 1024].into()))
            .await
            .expect("send");
        assert_eq!(read_close_code(&mut ws).await, Some(4413));

        let mut ws = raw_connect(&kbs.url(), "good:raw").await;
        assert!(matches!(read_frame(&mut ws).await, Frame::Hello { .. }));
        ws.send(Message::Text("hi".into())).await.expect("send");
        assert_eq!(read_close_code(&mut ws).await, Some(4400));
        assert_eq!(
            kbs.observer.handshake_outcomes(),
            ["too_large", "protocol_error"]
        );
        assert!(kbs.hub.is_empty());
    })
    .await;
}

#[tokio::test]
async fn wrong_proof_is_rejected_with_4401_and_bad_token_with_401() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let config = kbs.guest_config();
        let err = connect(&config, "good:g1", info("g1"), |_: &[u8]| {
            Ok(vec![0_u8; 32])
        })
        .await
        .expect_err("wrong proof accepted");
        assert!(
            matches!(
                err,
                ConnectError::Handshake(tunnel::handshake::HandshakeError::Rejected {
                    code: 4401,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(err.needs_reattest());

        let mut ws = raw_connect(&kbs.url(), "good:raw").await;
        let reject = raw_handshake(&mut ws, false).await;
        assert!(
            matches!(reject, Frame::Reject { code: 4401, .. }),
            "{reject:?}"
        );
        assert_eq!(read_close_code(&mut ws).await, Some(4401));

        let err = connect(&config, "bad-token", info("g1"), unseal)
            .await
            .expect_err("bad token accepted");
        assert!(matches!(err, ConnectError::Http { status: 401 }), "{err:?}");
        assert!(err.needs_reattest());
        assert_eq!(
            kbs.observer.handshake_outcomes(),
            ["bad_proof", "bad_proof"]
        );
        assert!(kbs.hub.is_empty());
        assert!(
            kbs.proven.lock().expect("lock").is_empty(),
            "the proof hook ran without a proof"
        );
    })
    .await;
}

#[tokio::test]
async fn the_proof_hook_runs_once_after_the_proof_and_before_registration() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let (session, serving) = kbs.guest("g1", TestService::default()).await;
        let handle = kbs.registered("g1").await;
        assert_eq!(
            *kbs.proven.lock().expect("lock"),
            [("g1".to_owned(), handle.epoch, false)],
            "once, with the tunnel's epoch, before the hub had it"
        );
        session.close();
        let _ = serving.await;
    })
    .await;
}

#[tokio::test]
async fn a_replayed_proof_is_rejected_with_4401() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        // A first session answers its challenge; the proof is captured.
        let mut first = raw_connect(&kbs.url(), "good:replay").await;
        let Frame::Hello { challenge, .. } = read_frame(&mut first).await else {
            panic!("expected Hello");
        };
        let proof = Frame::Proof {
            nonce: unseal(&challenge).expect("unseal"),
            info: info("replay"),
        };
        first.send(encode(&proof)).await.expect("send proof");
        assert!(matches!(
            read_frame(&mut first).await,
            Frame::Welcome { .. }
        ));

        // A second session with the same token replays it: another challenge, refused.
        let mut second = raw_connect(&kbs.url(), "good:replay").await;
        let Frame::Hello {
            challenge: fresh, ..
        } = read_frame(&mut second).await
        else {
            panic!("expected Hello");
        };
        assert_ne!(fresh, challenge, "every session gets a fresh challenge");
        second.send(encode(&proof)).await.expect("send proof");
        let reject = read_frame(&mut second).await;
        assert!(
            matches!(reject, Frame::Reject { code: 4401, .. }),
            "{reject:?}"
        );
        assert_eq!(read_close_code(&mut second).await, Some(4401));
        assert_eq!(kbs.observer.handshake_outcomes(), ["ok", "bad_proof"]);
        // The first tunnel is untouched.
        assert_eq!(kbs.hub.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_second_tunnel_supersedes_the_first_with_4409() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let (first, first_serving) = kbs.guest("g1", TestService::default()).await;
        kbs.wait_for_tunnels(1).await;
        let old_epoch = kbs.hub.get("g1").expect("first").epoch;

        let (_second, _second_serving) = kbs.guest("g1", TestService::default()).await;
        let closed = first_serving.await.expect("first serve task");
        assert_eq!(closed.close.code, CloseCode::Superseded.code());
        assert!(closed.close.by_peer);
        assert_eq!(first.closed().await.close.code, 4409);

        // The first tunnel's cleanup has run (it reported its 4409) and left the new one.
        wait_until(|| kbs.observer.disconnect_codes() == [4409]).await;
        let live = kbs.hub.get("g1").expect("second still registered");
        assert!(live.epoch > old_epoch);
        assert_eq!(kbs.hub.len(), 1);
        assert_echoes(&live, b"new").await;
    })
    .await;
}

#[tokio::test]
async fn draining_sends_goaway_then_4503() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            drain_reconnect_after: Duration::from_millis(250),
            ..TunnelLimits::default()
        })
        .await;
        let (_a, serving_a) = kbs.guest("a", TestService::default()).await;
        let (_b, serving_b) = kbs.guest("b", TestService::default()).await;
        kbs.wait_for_tunnels(2).await;
        kbs.drain.cancel();
        for serving in [serving_a, serving_b] {
            let closed = serving.await.expect("serve task");
            assert_eq!(closed.close.code, CloseCode::GoingAway.code());
            let after = closed.reconnect_after.expect("GoAway received");
            assert!(after >= Duration::from_millis(250) && after <= Duration::from_millis(500));
        }
        kbs.wait_for_tunnels(0).await;
        assert_eq!(kbs.observer.disconnect_codes(), [4503, 4503]);
    })
    .await;
}

// Real time, not paused: tokio's auto-advance fires timers while loopback I/O is still in
// flight, which breaks heartbeats. The timer logic itself is tested with paused time in
// `liveness.rs`; here the deadline is the next whole second.
#[tokio::test]
async fn token_deadline_without_reauth_closes_4401() {
    within(async {
        let kbs = TestKbs::start(KbsOptions {
            reauth_before: std::sync::Arc::new(|| unix_now() + 1),
            ..KbsOptions::default()
        })
        .await;
        let started = tokio::time::Instant::now();
        let (session, serving) = kbs.guest("g1", TestService::default()).await;
        let closed = serving.await.expect("serve task");
        assert_eq!(closed.close.code, CloseCode::Auth.code(), "{closed:?}");
        assert!(closed.needs_reattest());
        assert!(started.elapsed() <= Duration::from_secs(3));
        assert_eq!(session.closed().await.close.code, 4401);
        kbs.wait_for_tunnels(0).await;
        assert_eq!(kbs.observer.disconnect_codes(), [4401]);
    })
    .await;
}

#[tokio::test]
async fn reauth_in_band_extends_the_deadline() {
    within(async {
        let kbs = TestKbs::start(KbsOptions {
            reauth_before: std::sync::Arc::new(|| unix_now() + 2),
            reauth_extends_to: std::sync::Arc::new(|| unix_now() + 100_000),
            ..KbsOptions::default()
        })
        .await;
        let (session, mut serving) = kbs.guest("g1", TestService::default()).await;
        kbs.wait_for_tunnels(1).await;
        let before = session.reauth_before();
        let new_deadline = session
            .reauth("good:g1-fresh".into())
            .await
            .expect("reauth");
        assert!(new_deadline > before);
        assert_eq!(session.reauth_before(), new_deadline);
        assert_eq!(kbs.reauth_calls.load(Ordering::SeqCst), 1);
        // Past the first deadline the tunnel is still up.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            closed = &mut serving => panic!("tunnel closed: {closed:?}"),
        }
        let handle = kbs.hub.get("g1").expect("still registered");
        assert_echoes(&handle, b"ok").await;
    })
    .await;
}

#[tokio::test]
async fn refused_reauth_closes_4401() {
    within(async {
        let kbs = TestKbs::start(KbsOptions::default()).await;
        let (session, serving) = kbs.guest("g1", TestService::default()).await;
        kbs.wait_for_tunnels(1).await;
        let err = session
            .reauth("stolen".into())
            .await
            .expect_err("refused token accepted");
        assert!(
            matches!(&err, tunnel::ReauthError::Closed(c) if c.close.code == 4401),
            "{err:?}"
        );
        assert_eq!(serving.await.expect("serve").close.code, 4401);
        kbs.wait_for_tunnels(0).await;
    })
    .await;
}

#[tokio::test]
async fn silent_guest_is_dropped_with_4408() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            heartbeat: Duration::from_millis(100),
            ..TunnelLimits::default()
        })
        .await;
        let ws = kbs.raw_tunnel().await;
        // Never read again: no pongs go back.
        wait_until(|| kbs.observer.disconnect_codes() == [4408]).await;
        kbs.wait_for_tunnels(0).await;
        drop(ws);
    })
    .await;
}

#[tokio::test]
async fn guest_that_stops_reading_is_dropped() {
    within(async {
        let kbs = TestKbs::with_limits(TunnelLimits {
            write_stall_timeout: Duration::from_millis(300),
            max_frame: 1 << 20,
            ..TunnelLimits::default()
        })
        .await;
        let ws = kbs.raw_tunnel().await;
        let handle = kbs.registered("raw").await;
        // Push calls at a guest that never reads until the socket buffers fill.
        let mut calls = Vec::new();
        for _ in 0..64 {
            let h = handle.clone();
            calls.push(tokio::spawn(async move {
                h.ping(vec![7; 512 * 1024], Some(Duration::from_secs(30)))
                    .await
            }));
        }
        wait_until(|| !kbs.observer.disconnect_codes().is_empty()).await;
        let disconnected = kbs.observer.disconnected.lock().expect("lock").clone();
        assert_eq!(disconnected[0].1, 4408, "{disconnected:?}");
        assert_eq!(disconnected[0].2, "guest stopped reading");
        for call in calls {
            assert_eq!(call.await.expect("join"), Err(CallError::Disconnected));
        }
        kbs.wait_for_tunnels(0).await;
        drop(ws);
    })
    .await;
}
