//! A test PKI shaped like Intel's DCAP PKI (root CA, PCK platform CA, PCK certificate, TCB
//! signing certificate, root CA CRL and PCK CRL; ECDSA P-256 throughout), and the shared TDX
//! quote and collateral re-signed under it. Real Intel keys cannot sign a test CRL, so the
//! revocation tests run on this PKI with the verifier's Intel root replaced
//! (`TrustAnchors::with_intel_root_ca`); every other byte (TD report, QE report, TCB info,
//! QE identity, the PCK certificate's SGX extension) is the real vector's.
#![allow(dead_code, clippy::unwrap_used)]

use dcap_qvl::QuoteCollateralV3;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    CustomExtension, DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    RevocationReason, RevokedCertParams, SerialNumber, date_time_ymd,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Serial numbers of the test certificates (what a CRL lists).
pub const PCK_SERIAL: u64 = 0x5043_4b01;
pub const PCK_CA_SERIAL: u64 = 0x5043_4b02;
pub const TCB_SIGNER_SERIAL: u64 = 0x5443_4201;

/// The test PKI.
pub struct IntelPki {
    root: CertifiedIssuer<'static, KeyPair>,
    pck_ca: CertifiedIssuer<'static, KeyPair>,
    tcb_signer: rcgen::Certificate,
    tcb_signer_key: EcdsaKeyPair,
    pck: rcgen::Certificate,
    pck_key: EcdsaKeyPair,
}

fn ring_key(k: &KeyPair) -> EcdsaKeyPair {
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &k.serialize_der(),
        &SystemRandom::new(),
    )
    .unwrap()
}

fn sign(k: &EcdsaKeyPair, msg: &[u8]) -> Vec<u8> {
    k.sign(&SystemRandom::new(), msg).unwrap().as_ref().to_vec()
}

fn params(cn: &str, serial: u64, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Tether test PKI");
    p.serial_number = Some(SerialNumber::from(serial));
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2049, 12, 31);
    p.key_identifier_method = KeyIdMethod::Sha256;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    } else {
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ];
    }
    p
}

/// The SGX extension (1.2.840.113741.1.13.1) of the quote's real PCK certificate: FMSPC,
/// TCB components, PCE id... exactly what Intel's TCB info is matched against.
fn sgx_extension(quote: &[u8]) -> Vec<u8> {
    let certs = tee_verifiers::tdx::embedded_certs(quote);
    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
    leaf.extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.2.840.113741.1.13.1")
        .unwrap()
        .value
        .to_vec()
}

impl IntelPki {
    /// A new PKI whose PCK certificate carries the SGX extension of `quote`'s.
    pub fn new(quote: &[u8]) -> Self {
        let root = CertifiedIssuer::self_signed(
            params("Tether Test SGX Root CA", 1, true),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        )
        .unwrap();
        let pck_ca = CertifiedIssuer::signed_by(
            params("Tether Test SGX PCK Platform CA", PCK_CA_SERIAL, true),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            &root,
        )
        .unwrap();
        let tcb_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let tcb_signer = params("Tether Test SGX TCB Signing", TCB_SIGNER_SERIAL, false)
            .signed_by(&tcb_key, &root)
            .unwrap();
        let pck_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut pck_params = params("Tether Test SGX PCK Certificate", PCK_SERIAL, false);
        pck_params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                &[1, 2, 840, 113741, 1, 13, 1],
                sgx_extension(quote),
            ));
        let pck = pck_params.signed_by(&pck_key, &pck_ca).unwrap();
        IntelPki {
            tcb_signer_key: ring_key(&tcb_key),
            pck_key: ring_key(&pck_key),
            root,
            pck_ca,
            tcb_signer,
            pck,
        }
    }

    /// The root CA certificate (DER): what the verifier must be told to trust.
    pub fn root_der(&self) -> Vec<u8> {
        self.root.der().to_vec()
    }

    fn pck_chain_pem(&self) -> String {
        format!("{}{}{}", self.pck.pem(), self.pck_ca.pem(), self.root.pem())
    }

    fn signer_chain_pem(&self) -> String {
        format!("{}{}", self.tcb_signer.pem(), self.root.pem())
    }

    /// `quote` (v4 or v5) with a new attestation key signing its header and body, the QE
    /// report bound to that key and signed by the test PCK key, and the test PCK chain.
    pub fn resign_quote(&self, quote: &[u8]) -> Vec<u8> {
        let signed_len = tee_verifiers::tdx::quote::Quote::parse(quote)
            .unwrap()
            .signed_len();
        // Signature data: u32 length, ECDSA signature (64), attestation key (64),
        // certification data type 6 (u16) and size (u32), then QE report (384), its
        // signature (64), QE auth data (u16 length + bytes), and the PCK chain (type 5).
        let sig = &quote[signed_len + 4..];
        let inner = &sig[128 + 6..];
        let mut qe_report = inner[..384].to_vec();
        let auth_len = u16::from_le_bytes([inner[448], inner[449]]) as usize;
        let auth = &inner[450..450 + auth_len];

        let att_key =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let att_key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            att_key.as_ref(),
            &SystemRandom::new(),
        )
        .unwrap();
        let att_pub = &att_key.public_key().as_ref()[1..];
        let mut hashed = att_pub.to_vec();
        hashed.extend_from_slice(auth);
        let digest = ring::digest::digest(&ring::digest::SHA256, &hashed);
        qe_report[320..352].copy_from_slice(digest.as_ref());
        qe_report[352..384].fill(0);
        let qe_sig = sign(&self.pck_key, &qe_report);

        let pem = self.pck_chain_pem();
        let mut cert_data = qe_report;
        cert_data.extend_from_slice(&qe_sig);
        cert_data.extend_from_slice(&(auth_len as u16).to_le_bytes());
        cert_data.extend_from_slice(auth);
        cert_data.extend_from_slice(&5u16.to_le_bytes());
        cert_data.extend_from_slice(&(pem.len() as u32).to_le_bytes());
        cert_data.extend_from_slice(pem.as_bytes());

        let mut sig_data = sign(&att_key, &quote[..signed_len]);
        sig_data.extend_from_slice(att_pub);
        sig_data.extend_from_slice(&6u16.to_le_bytes());
        sig_data.extend_from_slice(&(cert_data.len() as u32).to_le_bytes());
        sig_data.extend_from_slice(&cert_data);

        let mut out = quote[..signed_len].to_vec();
        out.extend_from_slice(&(sig_data.len() as u32).to_le_bytes());
        out.extend_from_slice(&sig_data);
        out
    }

    /// `real` collateral re-signed under this PKI: the same TCB info and QE identity text
    /// signed by the test TCB signer, and CRLs of the test root (listing `root_revokes`) and
    /// PCK CA (listing `pck_revokes`), both valid 2020-2049.
    pub fn collateral(
        &self,
        real: &QuoteCollateralV3,
        root_revokes: &[u64],
        pck_revokes: &[u64],
    ) -> QuoteCollateralV3 {
        let crl = |issuer: &CertifiedIssuer<'static, KeyPair>, serials: &[u64]| {
            CertificateRevocationListParams {
                this_update: date_time_ymd(2020, 1, 1),
                next_update: date_time_ymd(2049, 12, 31),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|s| RevokedCertParams {
                        serial_number: SerialNumber::from(*s),
                        revocation_time: date_time_ymd(2021, 1, 1),
                        reason_code: Some(RevocationReason::KeyCompromise),
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(issuer)
            .unwrap()
            .der()
            .to_vec()
        };
        QuoteCollateralV3 {
            pck_crl_issuer_chain: format!("{}{}", self.pck_ca.pem(), self.root.pem()),
            root_ca_crl: crl(&self.root, root_revokes),
            pck_crl: crl(&self.pck_ca, pck_revokes),
            tcb_info_issuer_chain: self.signer_chain_pem(),
            tcb_info: real.tcb_info.clone(),
            tcb_info_signature: sign(&self.tcb_signer_key, real.tcb_info.as_bytes()),
            qe_identity_issuer_chain: self.signer_chain_pem(),
            qe_identity: real.qe_identity.clone(),
            qe_identity_signature: sign(&self.tcb_signer_key, real.qe_identity.as_bytes()),
            pck_certificate_chain: None,
        }
    }
}
