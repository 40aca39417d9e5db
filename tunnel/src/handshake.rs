//! Sans-IO tunnel handshake: proof of possession of the TEE key bound in the token.
//!
//! server -> guest `Hello { challenge }`, guest -> server `Proof { nonce }`,
//! server -> guest `Welcome` or `Reject` (a close with the same code follows).
//! The challenge is a JWE of 32 random bytes sealed to the token's TEE key (`tether.v1`), or
//! of those 32 bytes followed by the tunnel's 32-byte push key (`tether.v2`; the guest returns
//! only the nonce and keeps the key, see [`crate::PushKey`]): the server crate seals it and
//! hands the JWE and the expected bytes in, the guest passes an unseal callback, so this
//! module holds no cryptography beyond a constant-time compare.

use rpc_defs::{CloseCode, Frame, GuestInfo, PROTOCOL_VERSION, PUSH_KEY_LEN};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::push_key::PushKey;

/// Length of the challenge nonce in bytes.
pub const NONCE_LEN: usize = 32;

/// Smallest `max_frame` a guest accepts from a Hello (anything smaller cannot carry an RPC).
pub const MIN_MAX_FRAME: u32 = 4096;

/// Longest `instance_id` a Proof may carry, bytes (printable ASCII).
pub const MAX_INSTANCE_ID: usize = 128;
/// Longest `daemon_version` a Proof may carry, bytes (printable ASCII).
pub const MAX_DAEMON_VERSION: usize = 64;
/// Most `services` a Proof may name.
pub const MAX_SERVICES: usize = 16;
/// Longest service name, bytes (`[A-Za-z0-9._-]`).
pub const MAX_SERVICE_NAME: usize = 64;

/// Checks what a guest says of itself against the bounds above. These fields are kept for
/// the tunnel's lifetime and in the fleet view, shown in logs and on the dashboard, so they
/// are refused (not truncated: a cut value would silently misreport the guest) when too long
/// or not printable. The reason names the field and fits a close frame (123 bytes).
pub fn check_guest_info(info: &GuestInfo) -> Result<(), String> {
    let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
    let text = |field: &str, value: &str, max: usize| {
        if value.len() > max {
            Err(format!(
                "Proof {field} is {} bytes, at most {max}",
                value.len()
            ))
        } else if !printable(value) {
            Err(format!("Proof {field} must be printable ASCII"))
        } else {
            Ok(())
        }
    };
    text("instance_id", &info.instance_id, MAX_INSTANCE_ID)?;
    text("daemon_version", &info.daemon_version, MAX_DAEMON_VERSION)?;
    if info.services.len() > MAX_SERVICES {
        return Err(format!(
            "Proof services names {} services, at most {MAX_SERVICES}",
            info.services.len()
        ));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_SERVICE_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if !info.services.iter().all(|s| name_ok(s)) {
        return Err(format!(
            "Proof services: each is 1..={MAX_SERVICE_NAME} bytes of [A-Za-z0-9._-]"
        ));
    }
    Ok(())
}

/// What the server announces and grants in its Hello and Welcome.
#[derive(Clone, Debug)]
pub struct ServerHandshakeParams {
    /// Attested guest id (from the token claims, never from the guest).
    pub guest_id: String,
    /// Server-chosen session id.
    pub session_id: String,
    /// Heartbeat interval announced to the guest, seconds.
    pub heartbeat_s: u32,
    /// Largest frame the guest may send, bytes.
    pub max_frame: u32,
    /// Unix time (seconds) by which the guest must re-attest in band.
    pub reauth_before: u64,
}

/// Server side of the handshake.
pub struct ServerHandshake {
    challenge: Vec<u8>,
    expected_nonce: Zeroizing<[u8; NONCE_LEN]>,
    params: ServerHandshakeParams,
    state: ServerState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    Start,
    AwaitProof,
    Done,
}

/// Result of feeding the guest's answer to [`ServerHandshake::receive`].
#[derive(Debug)]
pub enum ServerOutcome {
    /// The proof is good: send `reply` (a Welcome) and start serving.
    Accepted {
        /// The Welcome frame to send.
        reply: Frame,
        /// What the guest said about itself (informational only).
        info: GuestInfo,
    },
    /// The handshake failed: send `reply` (a Reject), then close with `code`.
    Rejected {
        /// The Reject frame to send.
        reply: Frame,
        /// Close code that follows.
        code: CloseCode,
        /// Why, for logs and the Reject frame.
        reason: String,
        /// Short label for metrics: `bad_proof` or `protocol_error`.
        outcome: &'static str,
    },
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("params", &self.params)
            .field("state", &self.state)
            .field("expected_nonce", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// A handshake for one connection; `challenge_jwe` seals `expected_nonce` to the token's TEE key.
    pub fn new(
        challenge_jwe: Vec<u8>,
        mut expected_nonce: [u8; NONCE_LEN],
        params: ServerHandshakeParams,
    ) -> Self {
        let nonce = Zeroizing::new(expected_nonce);
        expected_nonce.zeroize();
        Self {
            challenge: challenge_jwe,
            expected_nonce: nonce,
            params,
            state: ServerState::Start,
        }
    }

    /// The Hello frame to send first (callable once; later calls return `None`).
    pub fn hello(&mut self) -> Option<Frame> {
        if self.state != ServerState::Start {
            return None;
        }
        self.state = ServerState::AwaitProof;
        Some(Frame::Hello {
            version: PROTOCOL_VERSION,
            challenge: std::mem::take(&mut self.challenge),
            heartbeat_s: self.params.heartbeat_s,
            max_frame: self.params.max_frame,
        })
    }

    /// Feeds the guest's first frame; anything but a Proof after Hello is a protocol error.
    pub fn receive(&mut self, frame: Frame) -> ServerOutcome {
        let state = std::mem::replace(&mut self.state, ServerState::Done);
        match (state, frame) {
            (ServerState::AwaitProof, Frame::Proof { nonce, info }) => {
                let nonce = Zeroizing::new(nonce);
                let good = nonce.len() == NONCE_LEN
                    && bool::from(nonce.as_slice().ct_eq(self.expected_nonce.as_slice()));
                if !good {
                    return rejected(CloseCode::Auth, "proof of possession failed", "bad_proof");
                }
                if let Err(reason) = check_guest_info(&info) {
                    return rejected(CloseCode::Protocol, &reason, "protocol_error");
                }
                ServerOutcome::Accepted {
                    reply: Frame::Welcome {
                        session_id: self.params.session_id.clone(),
                        guest_id: self.params.guest_id.clone(),
                        reauth_before: self.params.reauth_before,
                    },
                    info,
                }
            }
            (ServerState::AwaitProof, other) => rejected(
                CloseCode::Protocol,
                &format!("expected Proof, got {}", frame_name(&other)),
                "protocol_error",
            ),
            (_, other) => rejected(
                CloseCode::Protocol,
                &format!("unexpected {} during handshake", frame_name(&other)),
                "protocol_error",
            ),
        }
    }
}

fn rejected(code: CloseCode, reason: &str, outcome: &'static str) -> ServerOutcome {
    ServerOutcome::Rejected {
        reply: Frame::Reject {
            code: code.code(),
            reason: reason.to_owned(),
        },
        code,
        reason: reason.to_owned(),
        outcome,
    }
}

/// Short name of a frame's kind, for errors and logs (never its contents).
pub fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Proof { .. } => "Proof",
        Frame::Welcome { .. } => "Welcome",
        Frame::Reject { .. } => "Reject",
        Frame::Rpc(_) => "Rpc",
        Frame::Reauth { .. } => "Reauth",
        Frame::ReauthOk { .. } => "ReauthOk",
        Frame::GoAway { .. } => "GoAway",
    }
}

/// Why the guest side of a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server sent a frame that does not belong here (the guest closes with 4400).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u32),
    /// The challenge could not be opened with the TEE key.
    #[error("cannot unseal the challenge: {0}")]
    Unseal(String),
    /// The server refused the proof.
    #[error("rejected by the server ({code}): {reason}")]
    Rejected {
        /// Close code the server announced.
        code: u16,
        /// The server's reason.
        reason: String,
    },
}

impl HandshakeError {
    /// True when re-attesting (a fresh token) may help: the server refused our proof or token.
    pub fn needs_reattest(&self) -> bool {
        matches!(self, Self::Rejected { code, .. } if *code == CloseCode::Auth.code())
    }
}

/// What the server granted in its Welcome, plus the limits from its Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Server-chosen session id.
    pub session_id: String,
    /// Attested guest id.
    pub guest_id: String,
    /// Unix time (seconds) by which the guest must send `Reauth`.
    pub reauth_before: u64,
    /// Server heartbeat interval, seconds (at least 1).
    pub heartbeat_s: u32,
    /// Largest frame this guest may send, bytes (from the Hello).
    pub max_frame: u32,
    /// The tunnel's push key, when the challenge carried one (`tether.v2`).
    pub push_key: Option<PushKey>,
}

/// One step of the guest side.
#[derive(Debug)]
pub enum GuestStep {
    /// Send this frame (the Proof) and wait for the next one.
    Send(Frame),
    /// The tunnel is up.
    Established(Welcome),
}

/// Guest side of the handshake.
pub struct GuestHandshake<U> {
    info: Option<GuestInfo>,
    unseal: Option<U>,
    hello: Option<(u32, u32)>,
    push_key: Option<PushKey>,
}

impl<U> std::fmt::Debug for GuestHandshake<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHandshake")
            .field("info", &self.info)
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl<U> GuestHandshake<U>
where
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    /// A handshake that will answer the challenge with `unseal(challenge_jwe)`.
    pub fn new(info: GuestInfo, unseal: U) -> Self {
        Self {
            info: Some(info),
            unseal: Some(unseal),
            hello: None,
            push_key: None,
        }
    }

    /// Feeds the next server frame: Hello yields the Proof to send, Welcome ends the handshake.
    pub fn receive(&mut self, frame: Frame) -> Result<GuestStep, HandshakeError> {
        match frame {
            Frame::Hello {
                version,
                challenge,
                heartbeat_s,
                max_frame,
            } if self.hello.is_none() => {
                if version != PROTOCOL_VERSION {
                    return Err(HandshakeError::Version(version));
                }
                if max_frame < MIN_MAX_FRAME {
                    return Err(HandshakeError::Protocol(format!(
                        "max_frame {max_frame} is below {MIN_MAX_FRAME}"
                    )));
                }
                let (Some(unseal), Some(info)) = (self.unseal.take(), self.info.take()) else {
                    return Err(HandshakeError::Protocol("second Hello".into()));
                };
                let opened = Zeroizing::new(unseal(&challenge).map_err(HandshakeError::Unseal)?);
                // 32 bytes: the nonce (`tether.v1`); 64: the nonce then the push key (`tether.v2`).
                let (nonce, push_key) = match opened.len() {
                    NONCE_LEN => (&opened[..], None),
                    n if n == NONCE_LEN + PUSH_KEY_LEN => (
                        &opened[..NONCE_LEN],
                        PushKey::from_slice(&opened[NONCE_LEN..]),
                    ),
                    n => {
                        return Err(HandshakeError::Unseal(format!(
                            "challenge holds {n} bytes, expected {NONCE_LEN} or {}",
                            NONCE_LEN + PUSH_KEY_LEN
                        )));
                    }
                };
                self.hello = Some((heartbeat_s.max(1), max_frame));
                self.push_key = push_key;
                Ok(GuestStep::Send(Frame::Proof {
                    nonce: nonce.to_vec(),
                    info,
                }))
            }
            Frame::Welcome {
                session_id,
                guest_id,
                reauth_before,
            } => match self.hello.take() {
                Some((heartbeat_s, max_frame)) => Ok(GuestStep::Established(Welcome {
                    session_id,
                    guest_id,
                    reauth_before,
                    heartbeat_s,
                    max_frame,
                    push_key: self.push_key.take(),
                })),
                None => Err(HandshakeError::Protocol("Welcome before Hello".into())),
            },
            Frame::Reject { code, reason } => Err(HandshakeError::Rejected { code, reason }),
            other => Err(HandshakeError::Protocol(format!(
                "unexpected {} during handshake",
                frame_name(&other)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 32] = [7; 32];

    fn info() -> GuestInfo {
        GuestInfo {
            instance_id: "i-1".into(),
            daemon_version: "0.1.0".into(),
            services: vec!["resources".into()],
        }
    }

    fn new_server() -> ServerHandshake {
        ServerHandshake::new(
            b"sealed".to_vec(),
            NONCE,
            ServerHandshakeParams {
                guest_id: "g1".into(),
                session_id: "s1".into(),
                heartbeat_s: 20,
                max_frame: 1 << 20,
                reauth_before: 1000,
            },
        )
    }

    /// A fake unseal: the "JWE" is accepted only if it reads `sealed`.
    fn unseal(jwe: &[u8]) -> Result<Vec<u8>, String> {
        if jwe == b"sealed" {
            Ok(NONCE.to_vec())
        } else {
            Err("wrong key".into())
        }
    }

    #[test]
    fn good_proof_is_welcomed() {
        let mut server = new_server();
        let mut guest = GuestHandshake::new(info(), unseal);
        let hello = server.hello().expect("hello");
        assert!(server.hello().is_none(), "hello twice");
        let GuestStep::Send(proof) = guest.receive(hello).expect("proof") else {
            panic!("expected a proof");
        };
        let ServerOutcome::Accepted { reply, info: got } = server.receive(proof) else {
            panic!("proof refused");
        };
        assert_eq!(got, info());
        let GuestStep::Established(welcome) = guest.receive(reply).expect("welcome") else {
            panic!("expected welcome");
        };
        assert_eq!(
            welcome,
            Welcome {
                session_id: "s1".into(),
                guest_id: "g1".into(),
                reauth_before: 1000,
                heartbeat_s: 20,
                max_frame: 1 << 20,
                push_key: None,
            }
        );
    }

    #[test]
    fn a_v2_challenge_yields_the_push_key_and_only_the_nonce_is_returned() {
        let key = [9_u8; PUSH_KEY_LEN];
        let mut server = new_server();
        let mut guest = GuestHandshake::new(info(), |_: &[u8]| {
            Ok([NONCE.as_slice(), key.as_slice()].concat())
        });
        let hello = server.hello().expect("hello");
        let GuestStep::Send(proof) = guest.receive(hello).expect("proof") else {
            panic!("expected a proof");
        };
        let Frame::Proof { nonce, .. } = &proof else {
            panic!("expected a proof frame");
        };
        assert_eq!(
            nonce.as_slice(),
            NONCE.as_slice(),
            "the key never goes back"
        );
        let ServerOutcome::Accepted { reply, .. } = server.receive(proof) else {
            panic!("proof refused");
        };
        let GuestStep::Established(welcome) = guest.receive(reply).expect("welcome") else {
            panic!("expected welcome");
        };
        assert_eq!(welcome.push_key, PushKey::from_slice(&key));
    }

    #[test]
    fn a_challenge_of_another_length_is_refused() {
        for len in [0, 31, 33, 63, 65, 96] {
            let mut server = new_server();
            let mut guest = GuestHandshake::new(info(), move |_: &[u8]| Ok(vec![7_u8; len]));
            let err = guest
                .receive(server.hello().expect("hello"))
                .expect_err("odd challenge accepted");
            assert!(matches!(err, HandshakeError::Unseal(_)), "{len}: {err:?}");
        }
    }

    #[test]
    fn wrong_nonce_is_rejected_with_4401() {
        for nonce in [vec![8_u8; 32], vec![7_u8; 31], vec![7_u8; 33], vec![]] {
            let mut server = new_server();
            server.hello();
            let outcome = server.receive(Frame::Proof {
                nonce,
                info: info(),
            });
            let ServerOutcome::Rejected {
                reply,
                code,
                outcome,
                ..
            } = outcome
            else {
                panic!("bad proof accepted");
            };
            assert_eq!(code, CloseCode::Auth);
            assert_eq!(outcome, "bad_proof");
            assert!(matches!(reply, Frame::Reject { code: 4401, .. }));
        }
    }

    #[test]
    fn unexpected_frames_are_rejected_with_4400() {
        let mut server = new_server();
        server.hello();
        let ServerOutcome::Rejected { code, .. } = server.receive(Frame::Rpc(vec![1])) else {
            panic!("Rpc accepted as proof");
        };
        assert_eq!(code, CloseCode::Protocol);

        // A proof before the Hello was sent is out of order too.
        let mut early = new_server();
        let ServerOutcome::Rejected { code, .. } = early.receive(Frame::Proof {
            nonce: NONCE.to_vec(),
            info: info(),
        }) else {
            panic!("proof before hello accepted");
        };
        assert_eq!(code, CloseCode::Protocol);

        // After the first answer the handshake is over: a second proof is refused.
        let mut twice = new_server();
        twice.hello();
        let proof = Frame::Proof {
            nonce: NONCE.to_vec(),
            info: info(),
        };
        assert!(matches!(
            twice.receive(proof.clone()),
            ServerOutcome::Accepted { .. }
        ));
        assert!(matches!(
            twice.receive(proof),
            ServerOutcome::Rejected {
                code: CloseCode::Protocol,
                ..
            }
        ));
    }

    /// Issue 17, defect 10: what a guest says of itself is bounded: oversized or unprintable
    /// fields end the handshake with 4400 and a reason naming the field.
    #[test]
    fn oversized_or_unprintable_proof_fields_are_refused_with_4400() {
        let with = |f: &dyn Fn(&mut GuestInfo)| {
            let mut i = info();
            f(&mut i);
            i
        };
        let bad = [
            ("instance_id", with(&|i| i.instance_id = "i".repeat(129))),
            (
                "instance_id",
                with(&|i| i.instance_id = "i-1\nforged log line".into()),
            ),
            (
                "daemon_version",
                with(&|i| i.daemon_version = "v".repeat(65)),
            ),
            ("services", with(&|i| i.services = vec!["s".into(); 17])),
            ("services", with(&|i| i.services = vec!["s".repeat(65)])),
            ("services", with(&|i| i.services = vec!["a b".into()])),
        ];
        for (field, info) in bad {
            let mut server = new_server();
            server.hello();
            let outcome = server.receive(Frame::Proof {
                nonce: NONCE.to_vec(),
                info,
            });
            let ServerOutcome::Rejected {
                code,
                reason,
                outcome,
                ..
            } = outcome
            else {
                panic!("{field}: oversized proof accepted");
            };
            assert_eq!(code, CloseCode::Protocol, "{field}");
            assert_eq!(outcome, "protocol_error");
            assert!(reason.contains(field), "{field}: {reason}");
            assert!(reason.len() <= 123, "fits a close frame: {reason}");
        }
        // At the limits: welcomed.
        let mut server = new_server();
        server.hello();
        let at_limits = GuestInfo {
            instance_id: "i".repeat(128),
            daemon_version: "v".repeat(64),
            services: vec!["s".repeat(64); 16],
        };
        assert!(matches!(
            server.receive(Frame::Proof {
                nonce: NONCE.to_vec(),
                info: at_limits,
            }),
            ServerOutcome::Accepted { .. }
        ));
    }

    #[test]
    fn guest_reports_unseal_failure_and_bad_hello() {
        let mut guest = GuestHandshake::new(info(), unseal);
        let err = guest
            .receive(Frame::Hello {
                version: PROTOCOL_VERSION,
                challenge: b"other".to_vec(),
                heartbeat_s: 20,
                max_frame: 1 << 20,
            })
            .expect_err("unsealed a foreign challenge");
        assert!(matches!(err, HandshakeError::Unseal(_)));

        let mut guest = GuestHandshake::new(info(), unseal);
        let err = guest
            .receive(Frame::Hello {
                version: 2,
                challenge: b"sealed".to_vec(),
                heartbeat_s: 20,
                max_frame: 1 << 20,
            })
            .expect_err("accepted version 2");
        assert_eq!(err, HandshakeError::Version(2));

        let mut guest = GuestHandshake::new(info(), unseal);
        assert!(matches!(
            guest.receive(Frame::Welcome {
                session_id: "s".into(),
                guest_id: "g".into(),
                reauth_before: 1
            }),
            Err(HandshakeError::Protocol(_))
        ));
    }

    #[test]
    fn guest_sees_reject_and_knows_to_reattest() {
        let mut guest = GuestHandshake::new(info(), unseal);
        let err = guest
            .receive(Frame::Reject {
                code: 4401,
                reason: "proof of possession failed".into(),
            })
            .expect_err("reject is an error");
        assert!(err.needs_reattest());
        assert!(!HandshakeError::Protocol("x".into()).needs_reattest());
    }

    #[test]
    fn frames_are_named_in_errors_and_reasons() {
        let frames = [
            (
                Frame::Hello {
                    version: 1,
                    challenge: vec![],
                    heartbeat_s: 1,
                    max_frame: 1,
                },
                "Hello",
            ),
            (
                Frame::Proof {
                    nonce: vec![],
                    info: info(),
                },
                "Proof",
            ),
            (
                Frame::Welcome {
                    session_id: "s".into(),
                    guest_id: "g".into(),
                    reauth_before: 1,
                },
                "Welcome",
            ),
            (
                Frame::Reject {
                    code: 1,
                    reason: "r".into(),
                },
                "Reject",
            ),
            (Frame::Rpc(vec![]), "Rpc"),
            (Frame::Reauth { token: "t".into() }, "Reauth"),
            (Frame::ReauthOk { reauth_before: 1 }, "ReauthOk"),
            (
                Frame::GoAway {
                    reconnect_after_ms: 1,
                },
                "GoAway",
            ),
        ];
        for (frame, name) in frames {
            assert_eq!(frame_name(&frame), name);
        }
        let mut server = new_server();
        server.hello();
        let ServerOutcome::Rejected { reason, reply, .. } = server.receive(Frame::Rpc(vec![]))
        else {
            panic!("Rpc accepted as proof");
        };
        assert_eq!(reason, "expected Proof, got Rpc");
        assert_eq!(
            reply,
            Frame::Reject {
                code: 4400,
                reason: "expected Proof, got Rpc".into()
            }
        );
        let ServerOutcome::Rejected { reason, .. } = server.receive(Frame::GoAway {
            reconnect_after_ms: 1,
        }) else {
            panic!("GoAway accepted after the handshake");
        };
        assert_eq!(reason, "unexpected GoAway during handshake");
        let mut guest = GuestHandshake::new(info(), unseal);
        let err = guest
            .receive(Frame::ReauthOk { reauth_before: 1 })
            .expect_err("ReauthOk during the handshake");
        assert_eq!(
            err,
            HandshakeError::Protocol("unexpected ReauthOk during handshake".into())
        );
    }

    #[test]
    fn a_hello_at_the_smallest_max_frame_is_accepted_and_below_it_refused() {
        let hello = |max_frame| Frame::Hello {
            version: PROTOCOL_VERSION,
            challenge: b"sealed".to_vec(),
            heartbeat_s: 20,
            max_frame,
        };
        let mut guest = GuestHandshake::new(info(), unseal);
        assert!(matches!(
            guest.receive(hello(MIN_MAX_FRAME)),
            Ok(GuestStep::Send(_))
        ));
        let mut guest = GuestHandshake::new(info(), unseal);
        assert_eq!(
            guest.receive(hello(MIN_MAX_FRAME - 1)).unwrap_err(),
            HandshakeError::Protocol(format!(
                "max_frame {} is below {MIN_MAX_FRAME}",
                MIN_MAX_FRAME - 1
            ))
        );
        // A second Hello is out of order, whatever it says.
        let mut guest = GuestHandshake::new(info(), unseal);
        guest.receive(hello(MIN_MAX_FRAME)).expect("proof");
        assert_eq!(
            guest.receive(hello(MIN_MAX_FRAME)).unwrap_err(),
            HandshakeError::Protocol("unexpected Hello during handshake".into())
        );
    }

    #[test]
    fn debug_output_names_the_state_and_never_the_nonce() {
        let mut server = new_server();
        let text = format!("{server:?}");
        assert!(
            text.contains("ServerHandshake") && text.contains("Start"),
            "{text}"
        );
        assert!(text.contains("[redacted]") && text.contains("s1"), "{text}");
        assert!(
            !text.contains("7, 7, 7"),
            "the nonce is not printed: {text}"
        );
        server.hello();
        assert!(format!("{server:?}").contains("AwaitProof"));
        let mut guest = GuestHandshake::new(info(), unseal);
        let text = format!("{guest:?}");
        assert!(
            text.contains("GuestHandshake") && text.contains("i-1"),
            "{text}"
        );
        guest
            .receive(Frame::Hello {
                version: PROTOCOL_VERSION,
                challenge: b"sealed".to_vec(),
                heartbeat_s: 20,
                max_frame: 1 << 20,
            })
            .expect("proof");
        assert!(format!("{guest:?}").contains("1048576"), "{guest:?}");
    }

    #[test]
    fn zero_heartbeat_is_raised_to_one_second() {
        let mut guest = GuestHandshake::new(info(), unseal);
        guest
            .receive(Frame::Hello {
                version: PROTOCOL_VERSION,
                challenge: b"sealed".to_vec(),
                heartbeat_s: 0,
                max_frame: 1 << 20,
            })
            .expect("proof");
        let GuestStep::Established(w) = guest
            .receive(Frame::Welcome {
                session_id: "s".into(),
                guest_id: "g".into(),
                reauth_before: 1,
            })
            .expect("welcome")
        else {
            panic!("not established");
        };
        assert_eq!(w.heartbeat_s, 1);
    }
}
