#![allow(clippy::unwrap_used)]
//! The bad-input catalogue: a running KBS (real HTTP on loopback) gets malformed and hostile
//! requests, one table row each, written byte for byte on a raw socket (URL libraries would
//! normalise `..` and refuse invalid UTF-8 before sending). Every row names the status and the
//! error name of the JSON body it must get. After the table, nothing in the database has
//! changed and the server still answers. The catalogue is summarised in
//! docs/threat-model.md, section 4.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use guest_daemon::evidence::{EvidenceProvider, SampleAttester};
use guest_daemon::rcar::runtime_data_digest;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_types::{HashAlgorithm, RuntimeData};
use serde_json::{Value, json};
use tests::{ALLOW_SAMPLE, TestKbs, unix_secs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where every KBS error type lives.
const ERROR_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";
/// Body limit of the KBS under test (small, so oversized rows stay small).
const MAX_BODY: usize = 64 * 1024;
/// The resources seeded before the table; none may change.
const SEEDED: [(&str, &[u8]); 2] = [
    ("default/key/one", b"secret-1"),
    ("tenant/cert/two", b"secret-2"),
];

/// What a row expects: a status and the error name of the JSON body.
struct Expect {
    status: u16,
    /// The error name, or `""` for the few rows that document an accepted read.
    error: &'static str,
}

/// One row: a name, the raw request (with `{TOKEN}`-style placeholders filled in at run
/// time, see [`Fixtures::fill`]) and what the KBS must answer.
struct Row {
    name: &'static str,
    request: Vec<u8>,
    expect: Expect,
}

fn row(name: &'static str, request: impl Into<Vec<u8>>, status: u16, error: &'static str) -> Row {
    Row {
        name,
        request: request.into(),
        expect: Expect { status, error },
    }
}

/// A request with a body: `method path`, extra header lines, body bytes.
fn with_body(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn post_json(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    with_body(
        "POST",
        path,
        &format!("Content-Type: application/json\r\n{headers}"),
        body,
    )
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\n{headers}\r\n").into_bytes()
}

/// A tunnel upgrade request (its own `Connection` header: `close, Upgrade`).
fn upgrade(headers: &str) -> Vec<u8> {
    format!("GET /kbs/v0/tunnel HTTP/1.1\r\nHost: kbs\r\n{headers}\r\n").into_bytes()
}

const BEARER: &str = "Authorization: Bearer {TOKEN}\r\n";
const ADMIN: &str = "Authorization: Bearer {ADMIN}\r\n";
const COOKIE: &str = "Cookie: kbs-session-id={COOKIE}\r\n";
/// Upgrade headers; `close` as well, so the KBS ends the connection after an error answer.
const WS: &str = "Upgrade: websocket\r\nConnection: close, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn auth_body(version: &str, tee: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"version":{version},"tee":{tee},"extra-params":{extra}}}"#).into_bytes()
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The HTTP rows.
fn http_rows() -> Vec<Row> {
    let ok_auth = auth_body(r#""0.4.0""#, r#""sample""#, r#""""#);
    let big = "a".repeat(MAX_BODY + 1);
    let attestation = r#"{"init-data":null,"runtime-data":{"nonce":"{NONCE}","tee-pubkey":{JWK}},"tee-evidence":{"primary_evidence":{EVIDENCE},"additional_evidence":""}}"#;
    let with_init =
        |init: &str| attestation.replace(r#""init-data":null"#, &format!(r#""init-data":{init}"#));
    let mut invalid_utf8 = br#"{"version":"0.4.0"#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe]);
    invalid_utf8.extend_from_slice(br#"","tee":"sample","extra-params":""}"#);
    let mut chunked = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..(MAX_BODY / 4096 + 2) {
        chunked.extend_from_slice(format!("1000\r\n{}\r\n", " ".repeat(4096)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    vec![
        // --- POST /kbs/v0/auth: anyone can send these.
        row("auth: not JSON", post_json("/kbs/v0/auth", "", b"{not json"), 400, "MalformedRequest"),
        row("auth: empty body", post_json("/kbs/v0/auth", "", b""), 400, "MalformedRequest"),
        row("auth: a JSON array", post_json("/kbs/v0/auth", "", b"[]"), 400, "MalformedRequest"),
        row("auth: JSON null", post_json("/kbs/v0/auth", "", b"null"), 400, "MalformedRequest"),
        row("auth: version is a number", post_json("/kbs/v0/auth", "", &auth_body("4", r#""sample""#, r#""""#)), 400, "MalformedRequest"),
        row("auth: tee is a number", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, "1", r#""""#)), 400, "MalformedRequest"),
        row("auth: tee nobody knows", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""no-such-tee""#, r#""""#)), 400, "MalformedRequest"),
        row("auth: tee without a verifier", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""tdx""#, r#""""#)), 400, "UnknownTee"),
        row("auth: old protocol version", post_json("/kbs/v0/auth", "", &auth_body(r#""0.1.0""#, r#""sample""#, r#""""#)), 400, "InvalidRequestVersion"),
        row("auth: 60 KiB version string", post_json("/kbs/v0/auth", "", &auth_body(&format!("\"{}\"", "9".repeat(60 * 1024)), r#""sample""#, r#""""#)), 400, "InvalidRequestVersion"),
        row("auth: extra-params is a number", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""sample""#, "5")), 400, "InvalidRequest"),
        row("auth: hash list is a string", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""sample""#, r#"{"supported-hash-algorithms":"sha384"}"#)), 400, "InvalidRequest"),
        row("auth: hash list of numbers", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""sample""#, r#"{"supported-hash-algorithms":[1,2]}"#)), 400, "InvalidRequest"),
        row("auth: only unknown hashes", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""sample""#, r#"{"supported-hash-algorithms":["md5","crc32"]}"#)), 400, "UnsupportedHashAlgorithm"),
        row("auth: 10,000 nested arrays", post_json("/kbs/v0/auth", "", &auth_body(r#""0.4.0""#, r#""sample""#, &nested(10_000))), 400, "MalformedRequest"),
        row("auth: 10,000 nested objects", post_json("/kbs/v0/auth", "", format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000)).as_bytes()), 400, "MalformedRequest"),
        row("auth: invalid UTF-8 in a string", post_json("/kbs/v0/auth", "", &invalid_utf8), 400, "MalformedRequest"),
        row("auth: duplicate JSON key", post_json("/kbs/v0/auth", "", br#"{"version":"0.4.0","version":"0.1.0","tee":"sample","extra-params":""}"#), 400, "MalformedRequest"),
        row("auth: trailing garbage after the JSON", post_json("/kbs/v0/auth", "", &[ok_auth.as_slice(), b" {}"].concat()), 400, "MalformedRequest"),
        row("auth: form-encoded body", with_body("POST", "/kbs/v0/auth", "Content-Type: application/x-www-form-urlencoded\r\n", b"version=0.4.0&tee=sample"), 400, "MalformedRequest"),
        row("auth: body over the limit", post_json("/kbs/v0/auth", "", big.as_bytes()), 413, "PayloadTooLarge"),
        row("auth: chunked body over the limit", chunked, 413, "PayloadTooLarge"),
        row("auth: GET", get("/kbs/v0/auth", ""), 405, "MethodNotAllowed"),
        row("auth: invented method", with_body("BREW", "/kbs/v0/auth", "", &ok_auth), 405, "MethodNotAllowed"),
        // --- POST /kbs/v0/attest: the session cookie holder.
        row("attest: no cookie", post_json("/kbs/v0/attest", "", attestation.as_bytes()), 401, "SessionNotFound"),
        row("attest: forged cookie", post_json("/kbs/v0/attest", "Cookie: kbs-session-id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n", attestation.as_bytes()), 401, "SessionNotFound"),
        row("attest: token as the challenge cookie", post_json("/kbs/v0/attest", "Cookie: kbs-session-id={TOKEN}\r\n", attestation.as_bytes()), 401, "SessionNotFound"),
        row("attest: not JSON", post_json("/kbs/v0/attest", COOKIE, b"{\"runtime-data\":"), 400, "MalformedRequest"),
        row("attest: runtime-data is a string", post_json("/kbs/v0/attest", COOKIE, br#"{"init-data":null,"runtime-data":"x","tee-evidence":{}}"#), 400, "MalformedRequest"),
        row("attest: nonce of another challenge", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{NONCE}", "bm9uY2U=").as_bytes()), 401, "NonceMismatch"),
        row("attest: symmetric tee-pubkey", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{JWK}", r#"{"kty":"oct","k":"AAAA"}"#).as_bytes()), 400, "MalformedRequest"),
        row("attest: P-521 tee-pubkey", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{JWK}", r#"{"kty":"EC","crv":"P-521","alg":"ECDH-ES+A256KW","x":"AA","y":"AA"}"#).as_bytes()), 400, "UnsupportedTeePubKey"),
        row("attest: EC point not on the curve", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{JWK}", r#"{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#).as_bytes()), 400, "UnsupportedTeePubKey"),
        row("attest: init-data format json", post_json("/kbs/v0/attest", COOKIE, with_init(r#"{"format":"json","body":"{}"}"#).as_bytes()), 400, "InvalidInitData"),
        row("attest: init-data not TOML", post_json("/kbs/v0/attest", COOKIE, with_init(r#"{"format":"toml","body":"[tether\nguest_id ="}"#).as_bytes()), 400, "InvalidInitData"),
        row("attest: guest_id is a table", post_json("/kbs/v0/attest", COOKIE, with_init(r#"{"format":"toml","body":"[tether.guest_id]\na = 1\n"}"#).as_bytes()), 400, "InvalidInitData"),
        row("attest: init-data over its limit", post_json("/kbs/v0/attest", COOKIE, with_init(&format!(r##"{{"format":"toml","body":"# {}"}}"##, "x".repeat(MAX_BODY / 2))).as_bytes()), 413, "InitDataTooLarge"),
        row("attest: evidence not JSON", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{EVIDENCE}", r#""not json""#).as_bytes()), 401, "EvidenceVerificationFailed"),
        row("attest: evidence for another key", post_json("/kbs/v0/attest", COOKIE, attestation.replace("{JWK}", "{OTHER_JWK}").as_bytes()), 401, "EvidenceVerificationFailed"),
        // --- GET /kbs/v0/resource/...: attested guests.
        row("resource: ..", get("/kbs/v0/resource/../key/one", BEARER), 400, "InvalidResourcePath"),
        row("resource: %2e%2e", get("/kbs/v0/resource/default/%2e%2e/one", BEARER), 400, "InvalidResourcePath"),
        row("resource: %2E%2E", get("/kbs/v0/resource/%2E%2E/key/one", BEARER), 400, "InvalidResourcePath"),
        row("resource: .", get("/kbs/v0/resource/default/./one", BEARER), 400, "InvalidResourcePath"),
        row("resource: encoded slash", get("/kbs/v0/resource/default/key/a%2Fb", BEARER), 400, "InvalidResourcePath"),
        row("resource: encoded backslash", get("/kbs/v0/resource/default/key/a%5Cb", BEARER), 400, "InvalidResourcePath"),
        row("resource: NUL byte", get("/kbs/v0/resource/default/key/a%00b", BEARER), 400, "InvalidResourcePath"),
        row("resource: 4 KiB segment", get(&format!("/kbs/v0/resource/default/key/{}", "k".repeat(4096)), BEARER), 400, "InvalidResourcePath"),
        row("resource: empty segment", get("/kbs/v0/resource/default//one", BEARER), 400, "InvalidResourcePath"),
        row("resource: four segments", get("/kbs/v0/resource/default/key/one/more", BEARER), 404, "NotFound"),
        row("resource: not UTF-8 after decoding", get("/kbs/v0/resource/default/key/%FF", BEARER), 400, "MalformedRequest"),
        // Query parameters are decoded lossily (U+FFFD) and handed to the policy as they are.
        row("resource: query not UTF-8 (a read the policy allows)", get("/kbs/v0/resource/default/key/one?a=%FF", BEARER), 200, ""),
        row("resource: absent", get("/kbs/v0/resource/default/key/absent", BEARER), 404, "ResourceNotFound"),
        row("resource: no credentials", get("/kbs/v0/resource/default/key/one", ""), 401, "Unauthenticated"),
        row("resource: Basic auth", get("/kbs/v0/resource/default/key/one", "Authorization: Basic YTpi\r\n"), 401, "Unauthenticated"),
        row("resource: token of garbage", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer x.y.z\r\n"), 401, "InvalidToken"),
        row("resource: token alg none", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_ALG_NONE}\r\n"), 401, "InvalidToken"),
        row("resource: token HS256 keyed with the public key", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_HS256}\r\n"), 401, "InvalidToken"),
        row("resource: token of another key", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_FOREIGN}\r\n"), 401, "InvalidToken"),
        row("resource: token expired an hour ago", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_EXPIRED}\r\n"), 401, "TokenExpired"),
        row("resource: token expired past the 5 s leeway", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_SKEW_OUT}\r\n"), 401, "TokenExpired"),
        row("resource: token expired within the 5 s leeway (clock skew)", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_SKEW_IN}\r\n"), 200, ""),
        row("resource: token without exp", get("/kbs/v0/resource/default/key/one", "Authorization: Bearer {TOKEN_NO_EXP}\r\n"), 401, "InvalidToken"),
        row("resource: token of 64 KiB", get("/kbs/v0/resource/default/key/one", &format!("Authorization: Bearer {}\r\n", "A".repeat(64 * 1024))), 401, "InvalidToken"),
        row("resource: token in the session cookie, tampered", get("/kbs/v0/resource/default/key/one", "Cookie: kbs-session-id={TOKEN}x\r\n"), 401, "SessionNotFound"),
        // --- Admin API.
        row("admin: no token", with_body("POST", "/kbs/v0/resource/default/key/new", "", b"x"), 401, "AdminAuthRequired"),
        row("admin: token of garbage", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer garbage\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: alg none", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_ALG_NONE}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: HS256", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_HS256}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: attestation token", with_body("POST", "/kbs/v0/resource/default/key/new", BEARER, b"x"), 401, "AdminTokenInvalid"),
        row("admin: another Ed25519 key", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_FOREIGN}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: expired", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_EXPIRED}\r\n", b"x"), 401, "AdminTokenExpired"),
        row("admin: not valid before an hour from now", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_FUTURE}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: audience is not KBS", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_WRONG_AUD}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: no exp", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_NO_EXP}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin: no role", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_NO_ROLE}\r\n", b"x"), 403, "AdminRoleMissing"),
        row("admin: role nobody defined", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_ROLE_X}\r\n", b"x"), 403, "AdminRoleDenied"),
        row("admin: duplicate role claim", with_body("POST", "/kbs/v0/resource/default/key/new", "Authorization: Bearer {ADMIN_DUP_ROLE}\r\n", b"x"), 401, "AdminTokenInvalid"),
        row("admin put: ..", with_body("POST", "/kbs/v0/resource/default/../new", ADMIN, b"x"), 400, "InvalidResourcePath"),
        row("admin put: %2e%2e", with_body("POST", "/kbs/v0/resource/%2e%2e/key/new", ADMIN, b"x"), 400, "InvalidResourcePath"),
        row("admin put: 4 KiB segment", with_body("POST", &format!("/kbs/v0/resource/default/key/{}", "n".repeat(4096)), ADMIN, b"x"), 400, "InvalidResourcePath"),
        row("admin put: body over the limit", with_body("POST", "/kbs/v0/resource/default/key/new", ADMIN, big.as_bytes()), 413, "PayloadTooLarge"),
        row("admin delete: ..", with_body("DELETE", "/kbs/v0/resource/../key/one", ADMIN, b""), 400, "InvalidResourcePath"),
        row("admin versions: %2e%2e", get("/kbs/v0/admin/resources/default/%2e%2e/one/versions", ADMIN), 400, "InvalidResourcePath"),
        row("admin versions: not UTF-8", get("/kbs/v0/admin/resources/default/key/%C0%AF/versions", ADMIN), 400, "MalformedRequest"),
        row("admin policy: not JSON", post_json("/kbs/v0/resource-policy", ADMIN, b"package policy"), 400, "MalformedRequest"),
        row("admin policy: policy is a number", post_json("/kbs/v0/resource-policy", ADMIN, br#"{"policy":5}"#), 400, "MalformedRequest"),
        row("admin policy: not base64url", post_json("/kbs/v0/resource-policy", ADMIN, br#"{"policy":"***"}"#), 400, "MalformedRequest"),
        row("admin policy: not Rego", post_json("/kbs/v0/resource-policy", ADMIN, format!(r#"{{"policy":"{}"}}"#, URL_SAFE_NO_PAD.encode("package policy\nallow if {")).as_bytes()), 400, "PolicyCompile"),
        row("admin policy: deep nesting", post_json("/kbs/v0/resource-policy", ADMIN, format!(r#"{{"policy":{}}}"#, nested(5_000)).as_bytes()), 400, "MalformedRequest"),
        row("admin audit: limit=abc", get("/kbs/v0/admin/audit?limit=abc", ADMIN), 400, "MalformedRequest"),
        row("admin events: unknown parameter", get("/kbs/v0/admin/events?nope=1", ADMIN), 400, "MalformedRequest"),
        row("admin guests: limit is negative", get("/kbs/v0/admin/guests?limit=-1", ADMIN), 400, "MalformedRequest"),
        row("admin guests: overlong guest id", with_body("POST", &format!("/kbs/v0/admin/guests/{}/ping", "g".repeat(4096)), ADMIN, b""), 404, "GuestNotConnected"),
        row("admin rollout: id is not a number", get("/kbs/v0/rotation/rollouts/abc", ADMIN), 400, "MalformedRequest"),
        row("admin rollout: bad selector", post_json("/kbs/v0/rotation/rollouts", ADMIN, br#"{"path":"default/key/one","selector":"app in (("}"#), 400, "InvalidSelector"),
        row("admin rollout: bad path", post_json("/kbs/v0/rotation/rollouts", ADMIN, br#"{"path":"../key/one","selector":""}"#), 400, "InvalidResourcePath"),
        row("admin rollout: path is a list", post_json("/kbs/v0/rotation/rollouts", ADMIN, br#"{"path":["default","key","one"],"selector":""}"#), 400, "MalformedRequest"),
        row("admin plugin: unknown name", with_body("POST", "/kbs/v0/plugin/enable/nosuch", ADMIN, b""), 404, "PluginNotFound"),
        // --- GET /kbs/v0/tunnel: the upgrade.
        row("tunnel: no token", upgrade(&format!("{WS}Sec-WebSocket-Protocol: tether.v1\r\n")), 401, "Unauthenticated"),
        row("tunnel: token only as a cookie", upgrade(&format!("{WS}Sec-WebSocket-Protocol: tether.v1\r\nCookie: kbs-session-id={{TOKEN}}\r\n")), 401, "Unauthenticated"),
        row("tunnel: token of garbage", upgrade(&format!("{WS}Sec-WebSocket-Protocol: tether.v1\r\nAuthorization: Bearer x.y.z\r\n")), 401, "InvalidToken"),
        row("tunnel: expired token", upgrade(&format!("{WS}Sec-WebSocket-Protocol: tether.v1\r\nAuthorization: Bearer {{TOKEN_EXPIRED}}\r\n")), 401, "TokenExpired"),
        row("tunnel: no upgrade headers", get("/kbs/v0/tunnel", BEARER), 400, "WebSocketUpgradeRequired"),
        row("tunnel: WebSocket version 8", upgrade(&format!("{}Sec-WebSocket-Protocol: tether.v1\r\n{BEARER}", WS.replace("Version: 13", "Version: 8"))), 400, "WebSocketUpgradeRequired"),
        row("tunnel: no Sec-WebSocket-Key", upgrade(&format!("Upgrade: websocket\r\nConnection: close, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1\r\n{BEARER}")), 400, "WebSocketUpgradeRequired"),
        row("tunnel: no subprotocol", upgrade(&format!("{WS}{BEARER}")), 400, "SubprotocolRequired"),
        row("tunnel: unknown subprotocol", upgrade(&format!("{WS}Sec-WebSocket-Protocol: tether.v9, chat\r\n{BEARER}")), 400, "SubprotocolRequired"),
        row("tunnel: POST", with_body("POST", "/kbs/v0/tunnel", BEARER, b""), 405, "MethodNotAllowed"),
        // --- Anything else.
        row("unknown path", get("/kbs/v0/nothing-here", ""), 404, "NotFound"),
        row("8 KiB path", get(&format!("/kbs/v0/{}", "p".repeat(8 * 1024)), ""), 404, "NotFound"),
        row("disabled plugin's route", get("/kbs/v0/pki/ca", BEARER), 404, "PluginDisabled"),
    ]
}

/// Raw answer: status and JSON body (`Null` when the body is not JSON).
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Sends `request` on a fresh connection and reads the whole answer (`Connection: close`).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The KBS may answer (413) and close before it has read all of a large body.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 20 s");
    parse_answer(&buf)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut body = raw[split + 4..].to_vec();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    }
    Answer {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..(start + size).min(raw.len())]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    out
}

/// What the placeholders of the table stand for.
struct Fixtures {
    values: Vec<(&'static str, String)>,
}

impl Fixtures {
    async fn new(kbs: &TestKbs) -> Self {
        let key = TeeKeyPair::new_ec();
        let token = kbs.attest(&key, None).await;
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        let kbs_key = std::fs::read(kbs.data_dir.join("token.key")).unwrap();
        let es256 = |claims: &Value, pem: &[u8]| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
                claims,
                &jsonwebtoken::EncodingKey::from_ec_pem(pem).unwrap(),
            )
            .unwrap()
        };
        let now = unix_secs();
        let with = |changes: &[(&str, Value)]| {
            let mut c = claims.clone();
            for (k, v) in changes {
                match v {
                    Value::Null => {
                        c.as_object_mut().unwrap().remove(*k);
                    }
                    v => c[*k] = v.clone(),
                }
            }
            c
        };
        let foreign_pem = {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("k.pem");
            kbs_core::token::TokenSigner::load_or_generate(&path).unwrap();
            std::fs::read(path).unwrap()
        };
        let jwk = serde_json::to_string(&key.export_pubkey()).unwrap();
        let other_jwk = serde_json::to_string(&TeeKeyPair::new_ec().export_pubkey()).unwrap();

        // Admin tokens, signed by hand so every claim (and its spelling) is ours to choose.
        let admin_key = kbs.admin_key();
        let signing = ed25519_dalek::SigningKey::from_pkcs8_pem(&admin_key.private_pem()).unwrap();
        let foreign_admin = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let eddsa = |key: &ed25519_dalek::SigningKey, payload: &str| {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let sig = key.sign(input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
        };
        let admin_claims = |extra: &str| {
            format!(r#"{{"iss":"kbsctl","sub":"catalogue","aud":["KBS"],"iat":{now}{extra}}}"#)
        };
        let unsigned = |alg: &str, payload: &str| {
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
                URL_SAFE_NO_PAD.encode(payload)
            )
        };
        let hs256 = |payload: &str, secret: &[u8]| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &serde_json::from_str::<Value>(payload).unwrap(),
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let admin_ok = admin_claims(&format!(r#","role":"admin","exp":{}"#, now + 600));
        let values = vec![
            ("{TOKEN_ALG_NONE}", unsigned("none", &claims.to_string())),
            ("{TOKEN_HS256}", hs256(&claims.to_string(), &kbs_key)),
            ("{TOKEN_FOREIGN}", es256(&claims, &foreign_pem)),
            (
                "{TOKEN_EXPIRED}",
                es256(
                    &with(&[("exp", json!(now - 3600)), ("iat", json!(now - 3900))]),
                    &kbs_key,
                ),
            ),
            (
                "{TOKEN_SKEW_OUT}",
                es256(&with(&[("exp", json!(now - 60))]), &kbs_key),
            ),
            (
                "{TOKEN_SKEW_IN}",
                es256(&with(&[("exp", json!(now - 2))]), &kbs_key),
            ),
            (
                "{TOKEN_NO_EXP}",
                es256(&with(&[("exp", Value::Null)]), &kbs_key),
            ),
            ("{TOKEN}", token.clone()),
            ("{ADMIN_ALG_NONE}", unsigned("none", &admin_ok)),
            (
                "{ADMIN_HS256}",
                hs256(&admin_ok, admin_key.public_pem().as_bytes()),
            ),
            ("{ADMIN_FOREIGN}", eddsa(&foreign_admin, &admin_ok)),
            (
                "{ADMIN_EXPIRED}",
                eddsa(
                    &signing,
                    &admin_claims(&format!(r#","role":"admin","exp":{}"#, now - 3600)),
                ),
            ),
            (
                "{ADMIN_FUTURE}",
                eddsa(
                    &signing,
                    &admin_claims(&format!(
                        r#","role":"admin","nbf":{},"exp":{}"#,
                        now + 3600,
                        now + 7200
                    )),
                ),
            ),
            (
                "{ADMIN_WRONG_AUD}",
                eddsa(
                    &signing,
                    &admin_claims(&format!(r#","role":"admin","exp":{}"#, now + 600))
                        .replace(r#"["KBS"]"#, r#"["other"]"#),
                ),
            ),
            (
                "{ADMIN_NO_EXP}",
                eddsa(&signing, &admin_claims(r#","role":"admin""#)),
            ),
            (
                "{ADMIN_NO_ROLE}",
                eddsa(&signing, &admin_claims(&format!(r#","exp":{}"#, now + 600))),
            ),
            (
                "{ADMIN_ROLE_X}",
                eddsa(
                    &signing,
                    &admin_claims(&format!(r#","role":"x","exp":{}"#, now + 600)),
                ),
            ),
            (
                "{ADMIN_DUP_ROLE}",
                eddsa(
                    &signing,
                    &admin_claims(&format!(
                        r#","role":"reader","role":"admin","exp":{}"#,
                        now + 600
                    )),
                ),
            ),
            ("{ADMIN}", eddsa(&signing, &admin_ok)),
            ("{OTHER_JWK}", other_jwk),
            ("{JWK}", jwk),
        ];
        Self { values }
    }

    /// The request with its placeholders filled in; a fresh challenge for `{COOKIE}`.
    async fn fill(&self, kbs: &TestKbs, key: &TeeKeyPair, request: &[u8]) -> Vec<u8> {
        let Ok(text) = std::str::from_utf8(request) else {
            return request.to_vec();
        };
        if !text.contains('{') {
            return request.to_vec();
        }
        let mut text = text.to_string();
        for (k, v) in &self.values {
            text = text.replace(k, v);
        }
        if text.contains("{COOKIE}") || text.contains("{NONCE}") || text.contains("{EVIDENCE}") {
            let (cookie, nonce) = challenge(kbs).await;
            let evidence = evidence_for(key, &nonce).await;
            text = text
                .replace("{COOKIE}", &cookie)
                .replace("{NONCE}", &nonce)
                .replace("{EVIDENCE}", &evidence.to_string());
        }
        fix_length(text)
    }
}

/// Placeholders change the body's length: recompute `Content-Length`.
fn fix_length(text: String) -> Vec<u8> {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return text.into_bytes();
    };
    let head: Vec<String> = head
        .lines()
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("content-length:") {
                format!("Content-Length: {}", body.len())
            } else {
                l.to_string()
            }
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

/// A fresh RCAR challenge: the cookie value and the nonce.
async fn challenge(kbs: &TestKbs) -> (String, String) {
    let r = kbs
        .http()
        .post(format!("{}/kbs/v0/auth", kbs.url))
        .json(&json!({"version": "0.4.0", "tee": "sample", "extra-params": ""}))
        .send()
        .await
        .unwrap();
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("kbs-session-id=")
        .to_string();
    let body: Value = r.json().await.unwrap();
    (cookie, body["nonce"].as_str().unwrap().to_string())
}

/// Sample evidence that binds `key` and `nonce` (what an honest guest sends).
async fn evidence_for(key: &TeeKeyPair, nonce: &str) -> Value {
    let rd = RuntimeData {
        nonce: nonce.to_string(),
        tee_pubkey: key.export_pubkey(),
    };
    let digest = runtime_data_digest(&rd, "", HashAlgorithm::Sha384).unwrap();
    SampleAttester.primary_evidence(digest).await.unwrap()
}

/// Everything in the database an attacker must not be able to change: every table but the
/// event log (it records connections) and the fleet view, rendered row by row; in the audit
/// log, refused actions of the catalogue's valid admin token are left out.
async fn snapshot(kbs: &TestKbs) -> String {
    use sqlx::{AssertSqlSafe, Connection};
    let url = format!(
        "sqlite://{}?mode=ro",
        kbs.data_dir.join("tether.db").display()
    );
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name NOT IN ('events', 'fleet_guests', '_sqlx_migrations') ORDER BY name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "resources"), "{tables:?}");
    let mut out = String::new();
    for table in tables {
        let columns: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT name FROM pragma_table_info('{table}')"
        )))
        .fetch_all(&mut db)
        .await
        .unwrap();
        let row_expr = columns
            .iter()
            .map(|c| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        // The audit log records what an authenticated admin tried, refusals included: the
        // catalogue's own admin rows that failed are expected there, nothing else.
        let filter = if table == "audit_log" {
            "WHERE NOT (actor = 'catalogue@dev' AND outcome <> 'ok')"
        } else {
            ""
        };
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {row_expr} AS r FROM \"{table}\" {filter} ORDER BY r"
        )))
        .fetch_all(&mut db)
        .await
        .unwrap();
        out.push_str(&format!("{table}: {}\n", rows.join("\n  ")));
    }
    out
}

/// Each resource as the guest sees it (opened), with the admin API's version list.
async fn resources_as_seen(kbs: &TestKbs, key: &TeeKeyPair) -> Vec<(String, Vec<u8>, Value)> {
    let mut client = kbs.rcar_client(key, None);
    let mut out = Vec::new();
    for (path, _) in SEEDED {
        let plain = client.get_resource(&path.parse().unwrap()).await.unwrap();
        let versions = kbs.admin().resource_versions(path).await.unwrap();
        out.push((path.to_string(), plain.to_vec(), versions));
    }
    out
}

fn check(row: &Row, answer: &Answer) -> Result<(), String> {
    let got = format!(
        "{} {} {}",
        answer.status,
        answer.content_type,
        String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
    );
    if answer.status != row.expect.status {
        return Err(format!("status: want {}, got {got}", row.expect.status));
    }
    if row.expect.error.is_empty() {
        return Ok(());
    }
    if !answer.content_type.starts_with("application/json") {
        return Err(format!("not a JSON error body: {got}"));
    }
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| format!("{e}: {got}"))?;
    let name = body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix(ERROR_PREFIX))
        .ok_or_else(|| format!("no Trustee error type: {got}"))?;
    if name != row.expect.error {
        return Err(format!("error: want {}, got {got}", row.expect.error));
    }
    if body["detail"].as_str().unwrap_or("").is_empty() {
        return Err(format!("no detail: {got}"));
    }
    Ok(())
}

async fn healthz(addr: SocketAddr) {
    let a = exchange(addr, &get("/healthz", "")).await;
    assert_eq!(a.status, 200, "/healthz after the catalogue");
}

#[tokio::test]
async fn the_bad_input_catalogue() {
    let kbs = TestKbs::start_with(false, |c| {
        c.http.max_body_bytes = MAX_BODY;
        c.attestation.max_init_data_bytes = MAX_BODY / 4;
    })
    .await;
    let admin = kbs.admin();
    for (path, data) in SEEDED {
        admin.put_resource(path, data.to_vec()).await.unwrap();
    }
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    admin.set_plugin_enabled("pki", false).await.unwrap();
    let key = TeeKeyPair::new_ec();
    let fixtures = Fixtures::new(&kbs).await;
    let seen_before = resources_as_seen(&kbs, &key).await;
    let before = snapshot(&kbs).await;

    let rows = http_rows();
    let mut failures = Vec::new();
    for row in &rows {
        let request = fixtures.fill(&kbs, &key, &row.request).await;
        let answer = exchange(kbs.addr, &request).await;
        if let Err(e) = check(row, &answer) {
            failures.push(format!("{}: {e}", row.name));
        }
    }
    let ws = ws_rows();
    for row in &ws {
        if let Err(e) = row.run(&kbs).await {
            failures.push(format!("{}: {e}", row.name));
        }
    }
    if let Err(e) = slow_sender(&kbs, &fixtures).await {
        failures.push(format!("slow sender: {e}"));
    }
    let total = rows.len() + ws.len() + 1;
    assert!(total >= 60, "the catalogue has {total} rows");
    assert!(
        failures.is_empty(),
        "{} of {total} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    assert_eq!(snapshot(&kbs).await, before, "the database changed");
    assert_eq!(resources_as_seen(&kbs, &key).await, seen_before);
    healthz(kbs.addr).await;
}

/// A sender that stalls in the middle of an admin PUT body: whatever the KBS does with it
/// (today it waits; with a body timeout it answers 408), nothing is stored, and the KBS keeps
/// serving others meanwhile.
async fn slow_sender(kbs: &TestKbs, fixtures: &Fixtures) -> Result<(), String> {
    let request = fixtures
        .fill(
            kbs,
            &TeeKeyPair::new_ec(),
            format!(
                "POST /kbs/v0/resource/default/key/slow HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\n{ADMIN}Content-Length: 100\r\n\r\nonly-ten-b"
            )
            .as_bytes(),
        )
        .await;
    // `fill` recomputed the length: put the promise of 100 bytes back.
    let text = String::from_utf8(request).unwrap();
    let text = text.replace("Content-Length: 10\r\n", "Content-Length: 100\r\n");
    let mut s = TcpStream::connect(kbs.addr).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    healthz(kbs.addr).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    drop(s);
    if buf.len() >= 12 && buf.starts_with(b"HTTP/1.1 2") {
        return Err(format!("answered {}", String::from_utf8_lossy(&buf)));
    }
    healthz(kbs.addr).await;
    match kbs.admin().resource_versions("default/key/slow").await {
        Err(server::admin_client::ClientError::Api { status, .. }) if status.as_u16() == 404 => {
            Ok(())
        }
        other => Err(format!("default/key/slow: {other:?}")),
    }
}

/// A WebSocket row: upgrade with a valid token, read the Hello, send `frame`, and expect the
/// KBS to close with `close_code`.
struct WsRow {
    name: &'static str,
    /// Opcode, mask flag and payload of the frame the guest sends after the Hello.
    frame: (u8, bool, Vec<u8>),
    /// The close code, or 1002 for "a protocol error close or the connection dropped".
    close_code: u16,
}

fn ws_rows() -> Vec<WsRow> {
    let cbor_map = |key: &str, value: &[u8]| {
        let mut v = vec![0xa1, 0x60 | key.len() as u8];
        v.extend_from_slice(key.as_bytes());
        v.extend_from_slice(value);
        v
    };
    vec![
        WsRow {
            name: "ws: text frame",
            frame: (0x1, true, b"{\"Proof\":{}}".to_vec()),
            close_code: 4400,
        },
        WsRow {
            name: "ws: binary garbage",
            frame: (0x2, true, vec![0xff; 16]),
            close_code: 4400,
        },
        WsRow {
            name: "ws: truncated CBOR",
            frame: (0x2, true, vec![0xa1, 0x65, b'P', b'r']),
            close_code: 4400,
        },
        WsRow {
            name: "ws: Rpc before the proof",
            frame: (0x2, true, cbor_map("Rpc", &[0x40])),
            close_code: 4400,
        },
        WsRow {
            name: "ws: Proof with a wrong nonce",
            frame: (0x2, true, proof_frame(&[0u8; 32])),
            close_code: 4401,
        },
        WsRow {
            name: "ws: Proof with a 3-byte nonce",
            frame: (0x2, true, proof_frame(&[1, 2, 3])),
            close_code: 4401,
        },
        WsRow {
            name: "ws: frame over the guest limit",
            frame: (0x2, true, vec![0u8; 300 * 1024]),
            close_code: 4413,
        },
        WsRow {
            name: "ws: unmasked client frame",
            frame: (0x2, false, proof_frame(&[0u8; 32])),
            close_code: 1002,
        },
    ]
}

/// CBOR of `{"Proof": {"nonce": h'..', "info": {...}}}`.
fn proof_frame(nonce: &[u8]) -> Vec<u8> {
    let text = |s: &str| {
        let mut v = vec![0x60 | s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    };
    let mut v = vec![0xa1];
    v.extend(text("Proof"));
    v.push(0xa2);
    v.extend(text("nonce"));
    if nonce.len() < 24 {
        v.push(0x40 | nonce.len() as u8);
    } else {
        v.extend([0x58, nonce.len() as u8]);
    }
    v.extend_from_slice(nonce);
    v.extend(text("info"));
    v.push(0xa3);
    v.extend(text("instance_id"));
    v.extend(text("x"));
    v.extend(text("daemon_version"));
    v.extend(text("0"));
    v.extend(text("services"));
    v.push(0x80);
    v
}

impl WsRow {
    async fn run(&self, kbs: &TestKbs) -> Result<(), String> {
        let token = kbs.attest(&TeeKeyPair::new_ec(), None).await;
        let mut s = TcpStream::connect(kbs.addr).await.unwrap();
        let upgrade = format!(
            "GET /kbs/v0/tunnel HTTP/1.1\r\nHost: kbs\r\n{WS}Sec-WebSocket-Protocol: tether.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        s.write_all(upgrade.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await?;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("no upgrade: {head}"));
        }
        let (op, _) = read_frame(&mut s).await?;
        if op != 0x2 {
            return Err(format!("first frame has opcode {op}, not the binary Hello"));
        }
        let (op, masked, payload) = &self.frame;
        let _ = s.write_all(&ws_frame(*op, *masked, payload)).await;
        loop {
            match read_frame(&mut s).await {
                Ok((0x8, payload)) => {
                    let code = payload
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                        .unwrap_or(0);
                    return if code == self.close_code {
                        Ok(())
                    } else {
                        Err(format!(
                            "closed with {code}, want {} ({})",
                            self.close_code,
                            String::from_utf8_lossy(payload.get(2..).unwrap_or_default())
                        ))
                    };
                }
                Ok(_) => continue, // a Reject frame precedes the close
                Err(_) if self.close_code == 1002 => return Ok(()),
                Err(e) => return Err(format!("no close frame: {e}")),
            }
        }
    }
}

async fn read_head(s: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            other => return Err(format!("reading the upgrade answer: {other:?}")),
        }
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}

/// One server frame (servers never mask): opcode and payload.
async fn read_frame(s: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let io = |e: std::io::Error| e.to_string();
    let read = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.map_err(io)?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.map_err(io)?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.map_err(io)?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
        s.read_exact(&mut payload).await.map_err(io)?;
        Ok::<_, String>((h[0] & 0x0f, payload))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A client frame (masked unless told otherwise), FIN set.
fn ws_frame(op: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

#[test]
fn the_catalogue_keeps_its_size() {
    // docs/threat-model.md lists the rows; keep both in step.
    assert!(http_rows().len() + ws_rows().len() + 1 >= 60);
}
