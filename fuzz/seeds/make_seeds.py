#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/<target>/ (run from fuzz/; see scripts/fuzz.sh).

Seeds mirror the inputs the unit and whole-system tests use: well-formed frames, RCAR bodies,
init-data, selectors, tokens, pushes, and the TEE test evidence under server/tee-verifiers/testdata.
Tokens are signed with seeds/admin.key through kbsctl when target/debug/kbsctl exists.
"""
import base64, hashlib, json, os, struct, subprocess, sys

def head(major, n):
    if n < 24: return bytes([major << 5 | n])
    if n < 256: return bytes([major << 5 | 24, n])
    if n < 65536: return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 2**32: return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)

class B(bytes): pass

def cbor(v):
    if isinstance(v, bool): return b"\xf5" if v else b"\xf4"
    if v is None: return b"\xf6"
    if isinstance(v, int): return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, B): return head(2, len(v)) + bytes(v)
    if isinstance(v, str): e = v.encode(); return head(3, len(e)) + e
    if isinstance(v, list): return head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict): return head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(v)

def write(target, name, data):
    d = os.path.join("seeds", target); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

info = {"instance_id": "3f1c", "daemon_version": "0.1.0", "services": ["resources", "splitapi"]}
frames = {
    "hello": {"Hello": {"version": 1, "challenge": B(b'{"protected":"e30","encrypted_key":""}'), "heartbeat_s": 30, "max_frame": 1048576}},
    "proof": {"Proof": {"nonce": B(bytes(range(32))), "info": info}},
    "welcome": {"Welcome": {"session_id": "s-1", "guest_id": "web-1", "reauth_before": 1767225600}},
    "reject": {"Reject": {"code": 4401, "reason": "bad proof"}},
    "reauth": {"Reauth": {"token": "eyJhbGciOiJFUzI1NiJ9.e30.sig"}},
    "reauth_ok": {"ReauthOk": {"reauth_before": 1767225600}},
    "goaway": {"GoAway": {"reconnect_after_ms": 500}},
}
ping_req = [{"Request": {"context": {"deadline": None, "trace_context": {"trace_id": B(bytes(16)), "span_id": 1, "sampling_decision": "Unsampled"}}, "id": 1, "message": {"Ping": {"payload": B(b"hi")}}}}]
for name, f in frames.items():
    write("tunnel_frame", name, cbor(f))
write("tunnel_frame", "rpc_empty", cbor({"Rpc": B(b"")}))
write("tunnel_frame", "rpc_ping", cbor({"Rpc": B(cbor(ping_req[0]))}))
write("tunnel_frame", "rpc_long_header", bytes([0xa1, 0x63]) + b"Rpc" + bytes([0x5a, 0, 0, 0, 2]) + b"\xf6\xf6")

def framed(*parts):
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)
write("tunnel_handshake", "v1", bytes([32]) + framed(cbor(frames["hello"]), cbor(frames["welcome"])))
write("tunnel_handshake", "v2", bytes([64]) + framed(cbor(frames["hello"]), cbor(frames["welcome"])))
write("tunnel_handshake", "proof", bytes([32]) + framed(cbor(frames["proof"])))
write("tunnel_handshake", "reject", bytes([32]) + framed(cbor(frames["hello"]), cbor(frames["reject"])))

reqs = {
    "old_client": {"version": "0.4.0", "tee": "sample", "extra-params": ""},
    "hash_list": {"version": "0.4.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}},
    "tdx": {"version": "0.4.0", "tee": "tdx", "extra-params": {}},
    "bad_version": {"version": "0.3.0", "tee": "snp", "extra-params": ""},
    "sm3_only": {"version": "0.4.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": ["sm3"]}},
    # Only unknown names, joined longer than the 200 bytes the error detail keeps.
    "unknown_long": {"version": "0.4.0", "tee": "sample", "extra-params": {"supported-hash-algorithms": [f"blake{i:02}-x" for i in range(24)]}},
}
for name, r in reqs.items():
    write("rcar_request", name, json.dumps(r))

ec = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis", "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}
rsa = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": base64.urlsafe_b64encode(b"\xc3" * 256).rstrip(b"=").decode(), "e": "AQAB"}
init = '[tether]\nguest_id = "web-1"\n\n[tether.labels]\napp = "web"\n'
evidence = json.dumps({"svn": "1", "report_data": base64.b64encode(b"\x01" * 48).decode()})
atts = {
    "ec": {"init-data": None, "runtime-data": {"nonce": "", "tee-pubkey": ec}, "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}},
    "rsa": {"init-data": None, "runtime-data": {"nonce": "", "tee-pubkey": rsa}, "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}},
    "init_data": {"init-data": {"format": "toml", "body": init}, "runtime-data": {"nonce": "", "tee-pubkey": ec}, "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}},
}
for name, a in atts.items():
    write("rcar_attest", name, b"\x00" + json.dumps(a).encode())

inits = {
    "identity": init,
    "algorithm": 'algorithm = "sha256"\nversion = "0.1.0"\n[data]\n"policy.rego" = "package agent_policy"\n' + init,
    "ip_name": '[tether]\nguest_id = "db-1"\nname = "db-1.example"\nip = "10.0.0.7"\n',
    "empty": "",
}
for name, t in inits.items():
    write("init_data", name, t)

for i, s in enumerate(["app=web", "app=web,tier!=db", "env in (prod, staging)", "tier notin (db)", "app", "!canary", "", "a.b/c-d=e_f"]):
    write("label_selector", f"s{i}", s)

# CSRs: one per key type the plugin accepts, made with openssl.
def csr(args, san):
    key = subprocess.run(["openssl", "genpkey"] + args, capture_output=True, check=True).stdout
    with open("/tmp/fuzz-seed.key", "wb") as f: f.write(key)
    return subprocess.run(["openssl", "req", "-new", "-key", "/tmp/fuzz-seed.key", "-subj", "/CN=web-1",
                           "-addext", f"subjectAltName={san}"], capture_output=True, check=True).stdout
try:
    write("csr", "p256_pem", csr(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "DNS:web-1.example"))
    write("csr", "ed25519_pem", csr(["-algorithm", "ed25519"], "IP:10.0.0.1"))
    p384 = csr(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"], "DNS:web-1.example,IP:10.0.0.1")
    write("csr", "p384_der_b64", "".join(l.decode() for l in p384.splitlines()[1:-1]))
    der = subprocess.run(["openssl", "req", "-outform", "DER"], input=p384, capture_output=True, check=True).stdout
    write("csr", "p384_der", der)
finally:
    if os.path.exists("/tmp/fuzz-seed.key"): os.remove("/tmp/fuzz-seed.key")

kbsctl = "../target/debug/kbsctl"
if os.path.exists(kbsctl):
    for role, ttl in [("admin", "876000h"), ("reader", "876000h"), ("admin", "1s")]:
        tok = subprocess.run([kbsctl, "token", "--admin-key", "seeds/admin.key", "--role", role, "--ttl", ttl],
                             capture_output=True, check=True, env={**os.environ, "KBS_URL": "http://127.0.0.1:1"}).stdout.strip()
        write("admin_token", f"{role}_{ttl}", tok)
write("admin_token", "alg_none", "eyJhbGciOiJub25lIn0.eyJyb2xlIjoiYWRtaW4iLCJhdWQiOiJLQlMiLCJleHAiOjQxMDI0NDQ4MDB9.")
write("admin_token", "es256", "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjQxMDI0NDQ4MDB9.AAAA")

plain = b"secret-1"
write("guest_push", "resource", b"\x00" + cbor({"uri": "kbs:///default/key/one", "version": 3, "jwe": B(b'{"protected":"e30"}'), "sha256": hashlib.sha256(plain).hexdigest()}))
write("guest_push", "bundle", b"\x01" + cbor({"id": "splitapi", "version": 2, "files": [{"name": "cert.pem", "mode": 0o644}, {"name": "key.pem", "mode": 0o600}], "jwe": B(b"{}"), "not_after": 4102444800}))
write("guest_push", "bundle_plaintext", b"\x02" + cbor({"cert.pem": B(b"-----BEGIN CERTIFICATE-----\n"), "key.pem": B(b"k")}))
write("guest_push", "bundle_plaintext_extra", b"\x02" + cbor({"cert.pem": B(b"c"), "key.pem": B(b"k"), "x": B(b"")}))

td = "../server/tee-verifiers/testdata"
for name in ["tdx_quote", "tdx_quote_4.dat", "tdx_quote_outdated"]:
    q = open(f"{td}/tdx/{name}", "rb").read()
    write("tdx_evidence", name.replace(".", "_"), b"\x00" + q)
write("tdx_evidence", "wire_json", b"\x02" + json.dumps({"quote": base64.b64encode(open(f"{td}/tdx/tdx_quote_5.dat", "rb").read()).decode(), "cc_eventlog": None}).encode())
# A minimal CCEL: spec-id header event (SHA-1 format) announcing sha384, then one event.
spec = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1) + struct.pack("<HH", 0x000C, 48) + b"\x00"
hdr = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
ev = struct.pack("<IIIH", 1, 0x80000001, 1, 0x000C) + bytes(48) + struct.pack("<I", 4) + b"boot"
write("tdx_evidence", "eventlog", b"\x01" + hdr + ev)

for name, vek in [("test-report.bin", "test-vcek.der"), ("test-vlek-report.bin", "test-vlek.der")]:
    write("snp_evidence", name.replace(".", "_"), open(f"{td}/snp/{name}", "rb").read() + open(f"{td}/snp/{vek}", "rb").read())
write("snp_evidence", "report_only", open(f"{td}/snp/test-report.bin", "rb").read())
write("snp_evidence", "json", json.dumps({"attestation_report": list(open(f"{td}/snp/test-report.bin", "rb").read()), "cert_chain": []}))
print("seeds written")
