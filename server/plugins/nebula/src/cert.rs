//! Nebula's certificate format (v1, what `nebula-cert` 1.6 to 1.9 writes and every Nebula
//! node reads), without I/O: the protobuf `RawNebulaCertificate {Details = 1, Signature = 2}`
//! written by hand in the canonical encoding Go's protobuf marshaller produces (fields in
//! number order, zero values left out, `Ips` packed), because Nebula checks a signature over
//! its own re-encoding of the details and names an issuer by the SHA-256 of its re-encoded
//! certificate. CA keys are Ed25519, node keys X25519; keys and certificates are PEM with
//! Nebula's banners. docs/protocol.md, "nebula-ca", has the layout.

use std::net::Ipv4Addr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use sha2::Digest;
use zeroize::Zeroizing;

/// PEM banner of a certificate.
pub const CERT_BANNER: &str = "NEBULA CERTIFICATE";
/// PEM banner of a node's X25519 private key.
pub const X25519_PRIVATE_BANNER: &str = "NEBULA X25519 PRIVATE KEY";
/// PEM banner of a CA's Ed25519 private key (seed and public key, 64 bytes).
pub const ED25519_PRIVATE_BANNER: &str = "NEBULA ED25519 PRIVATE KEY";

/// An IPv4 network in a certificate: the address and its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The address (a node's own address, not the network's).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parse `a.b.c.d/n`.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = text.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        // No sign, no leading zeros: one spelling per network.
        if prefix.is_empty()
            || prefix.len() > 2
            || !prefix.bytes().all(|b| b.is_ascii_digit())
            || (prefix.len() > 1 && prefix.starts_with('0'))
        {
            return None;
        }
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The details a certificate signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Details {
    /// The node's (or CA's) name.
    pub name: String,
    /// Overlay addresses.
    pub ips: Vec<Ipv4Net>,
    /// Groups (the firewall matches on them).
    pub groups: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// X25519 (node) or Ed25519 (CA) public key.
    pub public_key: [u8; 32],
    /// A CA certificate.
    pub is_ca: bool,
    /// SHA-256 of the issuer's certificate; empty for a self-signed CA.
    pub issuer: Vec<u8>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    tag(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl Details {
    /// The protobuf encoding of `RawNebulaCertificateDetails` (what is signed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        bytes_field(&mut out, 1, self.name.as_bytes());
        if !self.ips.is_empty() {
            let mut packed = Vec::new();
            for ip in &self.ips {
                varint(&mut packed, u64::from(u32::from(ip.addr)));
                varint(&mut packed, u64::from(ip.mask()));
            }
            bytes_field(&mut out, 2, &packed);
        }
        for g in &self.groups {
            // A repeated string keeps empty elements (none are allowed here anyway).
            tag(&mut out, 4, 2);
            varint(&mut out, g.len() as u64);
            out.extend_from_slice(g.as_bytes());
        }
        for (field, v) in [(5, self.not_before), (6, self.not_after)] {
            if v != 0 {
                tag(&mut out, field, 0);
                varint(&mut out, v as u64);
            }
        }
        bytes_field(&mut out, 7, &self.public_key);
        if self.is_ca {
            tag(&mut out, 8, 0);
            out.push(1);
        }
        bytes_field(&mut out, 9, &self.issuer);
        out
    }

    /// Sign with `key`: the certificate's protobuf encoding.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let details = self.encode();
        let signature = key.sign(&details).to_bytes();
        let mut out = Vec::with_capacity(details.len() + 80);
        bytes_field(&mut out, 1, &details);
        bytes_field(&mut out, 2, &signature);
        out
    }
}

/// PEM as Go's `encoding/pem` writes it (64-column base64, trailing newline).
pub fn pem(banner: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = String::with_capacity(b64.len() + 2 * banner.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(banner);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(banner);
    out.push_str("-----\n");
    out
}

/// The bytes of the first PEM block with `banner` in `text`.
pub fn unpem(banner: &str, text: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {banner}-----");
    let end = format!("-----END {banner}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop].split_whitespace().collect();
    B64.decode(b64).ok()
}

/// SHA-256 of a certificate's encoding: its fingerprint, and the `issuer` of what it signs.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(cert).into()
}

/// A CA: its certificate and signing key.
pub struct Ca {
    /// The certificate's protobuf encoding.
    pub cert: Vec<u8>,
    /// Its details.
    pub details: Details,
    key: SigningKey,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.details.name)
            .field("not_after", &self.details.not_after)
            .finish_non_exhaustive()
    }
}

/// A node's credential, as `nebula-cert sign` writes it: `node.crt` and `node.key` (PEM).
pub struct NodeCredential {
    /// `node.crt`.
    pub cert_pem: String,
    /// `node.key`.
    pub key_pem: Zeroizing<String>,
    /// Unix seconds.
    pub not_after: i64,
    /// Hex fingerprint of the certificate (logged; never the key).
    pub fingerprint: String,
}

impl Ca {
    /// A new self-signed CA named `name`, valid from `now - backdate` to `not_after`.
    pub fn generate(name: &str, not_before: i64, not_after: i64) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *seed);
        let key = SigningKey::from_bytes(&seed);
        let details = Details {
            name: name.to_owned(),
            ips: Vec::new(),
            groups: Vec::new(),
            not_before,
            not_after,
            public_key: key.verifying_key().to_bytes(),
            is_ca: true,
            issuer: Vec::new(),
        };
        let cert = details.sign(&key);
        Self { cert, details, key }
    }

    /// Back from the stored certificate and key (Nebula's 64-byte Ed25519 key: seed, then
    /// public key).
    pub fn from_parts(cert: Vec<u8>, details: Details, key64: &[u8]) -> Option<Self> {
        let seed: [u8; 32] = key64.get(..32)?.try_into().ok()?;
        let key = SigningKey::from_bytes(&seed);
        (key.verifying_key().to_bytes() == details.public_key && key64.len() == 64)
            .then_some(Self { cert, details, key })
    }

    /// Whether the certificate is what the details signed with the key make.
    pub fn is_consistent(&self) -> bool {
        self.details.sign(&self.key) == self.cert
    }

    /// `ca.crt`.
    pub fn cert_pem(&self) -> String {
        pem(CERT_BANNER, &self.cert)
    }

    /// `ca.key`, as `nebula-cert ca` writes it (64 bytes: seed, public key).
    pub fn key_pem(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new([0u8; 64]);
        raw[..32].copy_from_slice(self.key.as_bytes());
        raw[32..].copy_from_slice(&self.details.public_key);
        Zeroizing::new(pem(ED25519_PRIVATE_BANNER, &*raw))
    }

    /// The key's 64 bytes, for storage (sealed under the KEK by the caller's namespace).
    pub fn key_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut raw = Zeroizing::new(Vec::with_capacity(64));
        raw.extend_from_slice(self.key.as_bytes());
        raw.extend_from_slice(&self.details.public_key);
        raw
    }

    /// A node credential: a fresh X25519 key pair and a certificate for `name`, `ip`,
    /// `groups`, valid from `not_before` to `not_after` (clamped to the CA's lifetime, which
    /// Nebula requires).
    pub fn issue(
        &self,
        name: &str,
        ip: Ipv4Net,
        groups: &[String],
        not_before: i64,
        not_after: i64,
    ) -> NodeCredential {
        let mut private = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *private);
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(*private).to_bytes();
        let details = Details {
            name: name.to_owned(),
            ips: vec![ip],
            groups: groups.to_vec(),
            not_before: not_before.max(self.details.not_before),
            not_after: not_after.min(self.details.not_after),
            public_key: public,
            is_ca: false,
            issuer: fingerprint(&self.cert).to_vec(),
        };
        let cert = details.sign(&self.key);
        NodeCredential {
            cert_pem: pem(CERT_BANNER, &cert),
            key_pem: Zeroizing::new(pem(X25519_PRIVATE_BANNER, &*private)),
            not_after: details.not_after,
            fingerprint: hex::encode(fingerprint(&cert)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn networks_parse_one_spelling() {
        let n = Ipv4Net::parse("10.42.0.7/16").unwrap();
        assert_eq!(n.to_string(), "10.42.0.7/16");
        assert_eq!(n.mask(), 0xffff_0000);
        assert_eq!(Ipv4Net::parse("10.0.0.1/0").unwrap().mask(), 0);
        assert_eq!(Ipv4Net::parse("10.0.0.1/32").unwrap().mask(), u32::MAX);
        for bad in [
            "10.42.0.7",
            "10.42.0.7/33",
            "10.42.0.7/016",
            "10.42.0.7/",
            "::1/64",
            "a/8",
            "10.0.0.1/+8",
        ] {
            assert!(Ipv4Net::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn details_encode_as_gos_protobuf_marshaller() {
        // Known answer, laid out by hand from cert.proto: name "a", one ip 10.0.0.1/8, group
        // "g", notBefore 1, notAfter 2, a public key of 32 x 0x07, not a CA, issuer [0xaa].
        let d = Details {
            name: "a".into(),
            ips: vec![Ipv4Net::parse("10.0.0.1/8").unwrap()],
            groups: vec!["g".into()],
            not_before: 1,
            not_after: 2,
            public_key: [7; 32],
            is_ca: false,
            issuer: vec![0xaa],
        };
        let mut want = vec![0x0a, 1, b'a'];
        // field 2, packed: 0x0a000001 and 0xff000000 as varints
        want.extend_from_slice(&[
            0x12, 9, 0x81, 0x80, 0x80, 0x50, 0x80, 0x80, 0x80, 0xf8, 0x0f,
        ]);
        want.extend_from_slice(&[0x22, 1, b'g', 0x28, 1, 0x30, 2, 0x3a, 32]);
        want.extend_from_slice(&[7; 32]);
        want.extend_from_slice(&[0x4a, 1, 0xaa]);
        assert_eq!(d.encode(), want);
    }

    #[test]
    fn a_node_certificate_names_its_issuer_and_verifies_under_the_ca_key() {
        let ca = Ca::generate("test ca", 100, 10_000);
        let node = ca.issue(
            "web-1",
            Ipv4Net::parse("10.42.0.7/16").unwrap(),
            &["web".into()],
            50,
            20_000,
        );
        assert_eq!(node.not_after, 10_000, "clamped to the CA");
        let raw = unpem(CERT_BANNER, &node.cert_pem).unwrap();
        // RawNebulaCertificate: field 1 details, field 2 signature (64 bytes).
        assert_eq!(raw[0], 0x0a);
        let (len, body) = (raw[1] as usize, &raw[2..]);
        let details = &body[..len];
        assert_eq!(&body[len..len + 2], &[0x12, 64]);
        let sig = ed25519_dalek::Signature::from_slice(&body[len + 2..]).unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&ca.details.public_key)
            .unwrap()
            .verify_strict(details, &sig)
            .unwrap();
        assert!(
            details.windows(32).any(|w| w == fingerprint(&ca.cert)),
            "issuer"
        );
        // The key is X25519: its public half is in the certificate.
        let private: [u8; 32] = unpem(X25519_PRIVATE_BANNER, &node.key_pem)
            .unwrap()
            .try_into()
            .unwrap();
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(private).to_bytes();
        assert!(details.windows(32).any(|w| w == public));
        // The CA key round-trips through its stored form.
        let again = Ca::from_parts(ca.cert.clone(), ca.details.clone(), &ca.key_bytes()).unwrap();
        assert_eq!(again.key.as_bytes(), ca.key.as_bytes());
        assert!(Ca::from_parts(ca.cert.clone(), ca.details.clone(), &[0; 64]).is_none());
    }
}
