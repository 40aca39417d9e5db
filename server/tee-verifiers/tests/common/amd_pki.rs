//! A test PKI shaped like AMD's SEV-SNP PKI (ARK, ASK, ASVK with RSASSA-PSS SHA-384, a P-384
//! VCEK with AMD's TCB extensions) and CRLs signed by its ARK, made at test time by
//! `amd_pki.sh` with the openssl CLI (real AMD keys cannot sign a test CRL), and the shared
//! SNP test report re-signed by its VCEK. Every other byte of the report is the real one's.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use tee_verifiers::TrustAnchors;
use tee_verifiers::snp::Generation;

/// Serials the CRLs list (what `amd_pki.sh` gives the VCEK and the ASK).
pub const VCEK_SERIAL: &str = "56434b";
pub const ASK_SERIAL: &str = "41534b";

/// The generated PKI, in a temporary directory.
pub struct AmdPki {
    dir: tempfile::TempDir,
}

fn der_of(pem: &[u8]) -> Vec<u8> {
    tee_verifiers::anchors::certificates(pem).remove(0)
}

impl AmdPki {
    /// Generates the PKI; its VCEK carries `report`'s chip id and reported TCB.
    pub fn new(report: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Written out rather than found by path: this file is also compiled into the server
        // crate's tests, whose manifest directory is another.
        let script = dir.path().join("amd_pki.sh");
        std::fs::write(&script, include_str!("amd_pki.sh")).unwrap();
        // REPORTED_TCB at 0x180 (Milan: bootloader, tee, reserved x4, snp, microcode).
        let tcb = &report[0x180..0x188];
        let out = Command::new("sh")
            .arg(&script)
            .arg(dir.path())
            .arg(hex::encode(&report[0x1A0..0x1E0]))
            .args([tcb[0], tcb[1], tcb[6], tcb[7]].map(|v| v.to_string()))
            .output()
            .expect("running amd_pki.sh (needs the openssl CLI)");
        assert!(
            out.status.success(),
            "amd_pki.sh failed (needs the openssl CLI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        AmdPki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cert(&self, name: &str) -> Vec<u8> {
        der_of(&std::fs::read(self.file(&format!("{name}.pem"))).unwrap())
    }

    /// The VCEK (DER).
    pub fn vcek(&self) -> Vec<u8> {
        self.cert("vcek")
    }

    /// The ARK, ASK and ASVK as one PEM text (the shape of AMD's `ask_ark_asvk.pem`).
    pub fn roots_pem(&self) -> Vec<u8> {
        ["ask", "ark", "asvk"]
            .iter()
            .flat_map(|n| std::fs::read(self.file(&format!("{n}.pem"))).unwrap())
            .collect()
    }

    /// The vendor anchors with this PKI as Milan's roots.
    pub fn anchors(&self) -> TrustAnchors {
        (*TrustAnchors::vendor())
            .clone()
            .with_amd_roots(
                Generation::Milan,
                self.cert("ark"),
                self.cert("ask"),
                self.cert("asvk"),
            )
            .unwrap()
    }

    /// A CRL (DER): `crl-none` (lists an unrelated serial), `crl-vcek`, `crl-ask` (signed by
    /// the ARK) or `crl-forged` (signed by another key of the ARK's name).
    pub fn crl(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(&format!("{name}.crl"))).unwrap()
    }

    /// `report` with its signature replaced by the VCEK's.
    pub fn resign(&self, report: &[u8]) -> Vec<u8> {
        let pk8 = std::fs::read(self.file("vcek.pk8")).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pk8, &SystemRandom::new())
                .unwrap();
        let sig = key.sign(&SystemRandom::new(), &report[..0x2A0]).unwrap();
        let (r, s) = sig.as_ref().split_at(48);
        let mut out = report.to_vec();
        for (offset, be) in [(0x2A0usize, r), (0x2E8, s)] {
            let mut le = [0u8; 72];
            for (i, b) in be.iter().rev().enumerate() {
                le[i] = *b;
            }
            out[offset..offset + 72].copy_from_slice(&le);
        }
        out
    }
}
