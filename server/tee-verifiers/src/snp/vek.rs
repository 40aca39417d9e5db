//! AMD's certificate chain for SEV-SNP: the ARK (root) and ASK/ASVK (intermediates) of each
//! processor generation, embedded here (public AMD roots, from trustee
//! `deps/verifier/src/snp/{milan,genoa,turin}_ask_ark_asvk.pem`), and the VCEK/VLEK that signs
//! reports: chain check (RSASSA-PSS SHA-384, ring) and its AMD TCB extensions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use ring::signature::{RSA_PSS_2048_8192_SHA384, UnparsedPublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Generation;
use crate::request::SnpTcb;
use crate::{VerifyError, der};

const RSASSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
const OID_PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";

/// Which key signed a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VekKind {
    /// Versioned Chip Endorsement Key (per chip, from AMD KDS), issued by the ASK.
    Vcek,
    /// Versioned Loaded Endorsement Key (per cloud provider), issued by the ASVK.
    Vlek,
}

impl VekKind {
    /// "VCEK" or "VLEK".
    pub fn as_str(&self) -> &'static str {
        match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        }
    }
}

/// The DER ASK, ARK and ASVK of one generation, checked to chain when built.
#[derive(Debug)]
pub struct Roots {
    /// AMD SEV Key (issues VCEKs).
    pub ask: Vec<u8>,
    /// AMD Root Key.
    pub ark: Vec<u8>,
    /// AMD SEV VLEK Key (issues VLEKs).
    pub asvk: Vec<u8>,
    /// SHA-256 over the three, so keys verified under other roots are told apart.
    id: [u8; 32],
}

impl Roots {
    /// SHA-256 over the three certificates: what tells these roots from others.
    pub(crate) fn id(&self) -> [u8; 32] {
        self.id
    }

    /// Checks that the ARK is self-signed and signed the ASK and ASVK.
    pub fn new(ark: Vec<u8>, ask: Vec<u8>, asvk: Vec<u8>) -> Result<Self, String> {
        for (name, cert) in [("ARK", &ark), ("ASK", &ask), ("ASVK", &asvk)] {
            verify_signed_by(cert, &ark).map_err(|e| format!("{name}: {e}"))?;
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for c in [&ark, &ask, &asvk] {
            ctx.update(&(c.len() as u64).to_be_bytes());
            ctx.update(c);
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        Ok(Roots { ask, ark, asvk, id })
    }
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    crate::tdx::embedded_certs(pem.as_bytes())
}

/// AMD's public roots of each generation, embedded (trustee's PEM files), self-checked.
pub fn load_embedded_roots() -> Result<HashMap<Generation, Roots>, String> {
    let mut map = HashMap::new();
    for (generation, pem) in [
        (
            Generation::Milan,
            include_str!("roots/milan_ask_ark_asvk.pem"),
        ),
        (
            Generation::Genoa,
            include_str!("roots/genoa_ask_ark_asvk.pem"),
        ),
        (
            Generation::Turin,
            include_str!("roots/turin_ask_ark_asvk.pem"),
        ),
    ] {
        let certs = pem_certs(pem);
        let [ask, ark, asvk] = <[Vec<u8>; 3]>::try_from(certs)
            .map_err(|_| format!("{generation:?} roots: expected ASK, ARK, ASVK"))?;
        let roots = Roots::new(ark, ask, asvk).map_err(|e| format!("{generation:?} {e}"))?;
        map.insert(generation, roots);
    }
    Ok(map)
}

fn parse(der_bytes: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der_bytes) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks that `cert` carries an RSASSA-PSS SHA-384 signature by `issuer`'s key.
fn verify_signed_by(cert: &[u8], issuer: &[u8]) -> Result<(), String> {
    let cert = parse(cert)?;
    let issuer = parse(issuer)?;
    if cert.signature_algorithm.algorithm.to_id_string() != RSASSA_PSS {
        return Err("not signed with RSASSA-PSS".into());
    }
    let key = UnparsedPublicKey::new(
        &RSA_PSS_2048_8192_SHA384,
        &issuer.public_key().subject_public_key.data,
    );
    key.verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| "signature does not verify".to_string())
}

/// What a VCEK/VLEK says: its key and AMD extensions. [`verify_vek`] returns one only after
/// the chain to the generation's ARK verified.
#[derive(Debug, Clone)]
pub struct Vek {
    /// VCEK or VLEK.
    pub kind: VekKind,
    /// Generation whose roots it chains to.
    pub generation: Generation,
    /// Uncompressed P-384 public key (0x04 || x || y).
    pub public_key: Vec<u8>,
    /// TCB the key is issued for (its extensions).
    pub tcb: SnpTcb,
    /// hwID extension (VCEK only).
    pub hw_id: Option<Vec<u8>>,
}

/// Decodes a VCEK/VLEK given as DER or PEM.
pub fn decode_cert(bytes: &[u8]) -> Result<Vec<u8>, VerifyError> {
    if bytes.starts_with(b"-----BEGIN") {
        pem_certs(std::str::from_utf8(bytes).unwrap_or_default())
            .into_iter()
            .next()
            .ok_or_else(|| VerifyError::CertificateChain("PEM holds no certificate".into()))
    } else {
        Ok(bytes.to_vec())
    }
}

/// The processor generation named by a VEK's productName extension ("Milan-B0", "Genoa"...).
pub fn product_generation(vek_der: &[u8]) -> Result<Option<Generation>, VerifyError> {
    let cert = parse(vek_der).map_err(|e| VerifyError::CertificateChain(format!("VEK: {e}")))?;
    let Some(ext) = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == OID_PRODUCT_NAME)
    else {
        return Ok(None);
    };
    let name = der::single(ext.value)
        .filter(|t| t.tag == 0x16)
        .and_then(|t| std::str::from_utf8(t.value).ok())
        .ok_or_else(|| VerifyError::MalformedTcbExtension("productName".into()))?;
    Ok(Generation::from_product_name(name))
}

/// A key whose chain verified, with its validity period.
struct Verified {
    vek: Vek,
    not_before: i64,
    not_after: i64,
}

type VerifiedCache = Mutex<HashMap<(VekKind, Generation, [u8; 32], [u8; 32]), Arc<Verified>>>;

/// Most keys remembered as verified (a KBS sees one VCEK per chip and TCB).
const VERIFIED_MAX: usize = 4096;

/// Keys whose chain verified, by SHA-256 of their DER with kind and generation: a VCEK comes
/// back with every report of its chip, and the RSA-4096 chain check is a pure function of
/// those bytes (and of the roots, whose id is part of the key). Validity dates are still
/// checked at every call.
fn verified_cache() -> &'static VerifiedCache {
    static CACHE: OnceLock<VerifiedCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Verifies `vek_der` (a `kind` key) chains to `roots` (those of `generation`) through the
/// ASK (VCEK) or ASVK (VLEK), is valid at `now_unix`, and reads its TCB extensions.
pub fn verify_vek(
    vek_der: &[u8],
    kind: VekKind,
    generation: Generation,
    roots: &Roots,
    now_unix: i64,
) -> Result<Vek, VerifyError> {
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, vek_der).as_ref());
    let key = (kind, generation, roots.id, digest);
    let cached = verified_cache()
        .lock()
        .ok()
        .and_then(|c| c.get(&key).cloned());
    let verified = match cached {
        Some(v) => v,
        None => {
            let v = Arc::new(verify_chain(vek_der, kind, generation, roots)?);
            if let Ok(mut c) = verified_cache().lock() {
                if c.len() >= VERIFIED_MAX {
                    c.clear();
                }
                c.insert(key, v.clone());
            }
            v
        }
    };
    if now_unix < verified.not_before || now_unix > verified.not_after {
        return Err(VerifyError::CertificateChain(format!(
            "{} is outside its validity period at {now_unix}",
            kind.as_str()
        )));
    }
    Ok(verified.vek.clone())
}

fn verify_chain(
    vek_der: &[u8],
    kind: VekKind,
    generation: Generation,
    roots: &Roots,
) -> Result<Verified, VerifyError> {
    let issuer = match kind {
        VekKind::Vcek => &roots.ask,
        VekKind::Vlek => &roots.asvk,
    };
    verify_signed_by(vek_der, issuer).map_err(|e| {
        VerifyError::CertificateChain(format!(
            "{} is not issued by the {generation:?} {}: {e}",
            kind.as_str(),
            if kind == VekKind::Vcek { "ASK" } else { "ASVK" }
        ))
    })?;
    let cert = parse(vek_der).map_err(|e| VerifyError::CertificateChain(format!("VEK: {e}")))?;
    let validity = cert.validity();
    Ok(Verified {
        vek: read_extensions(vek_der, kind, generation)?,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// Reads a VCEK/VLEK's key and AMD extensions, without checking its chain.
pub fn read_extensions(
    vek_der: &[u8],
    kind: VekKind,
    generation: Generation,
) -> Result<Vek, VerifyError> {
    let cert = parse(vek_der).map_err(|e| VerifyError::CertificateChain(format!("VEK: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    if !cn.contains(kind.as_str()) {
        return Err(VerifyError::CertificateChain(format!(
            "certificate {cn:?} is not a {}",
            kind.as_str()
        )));
    }
    let spl = |oid: &str| -> Result<Option<u8>, VerifyError> {
        let Some(ext) = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
        else {
            return Ok(None);
        };
        der::single(ext.value)
            .and_then(der::small_uint)
            .and_then(|v| u8::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                VerifyError::MalformedTcbExtension(format!("{oid} is not an INTEGER 0..=255"))
            })
    };
    let required = |oid: &str| -> Result<u8, VerifyError> {
        spl(oid)?.ok_or_else(|| VerifyError::MalformedTcbExtension(format!("{oid} is missing")))
    };
    let tcb = SnpTcb {
        fmc: match generation {
            Generation::Turin => Some(required(OID_FMC)?),
            _ => spl(OID_FMC)?,
        },
        bootloader: required(OID_BOOTLOADER)?,
        tee: required(OID_TEE)?,
        snp: required(OID_SNP)?,
        microcode: required(OID_UCODE)?,
    };
    let hw_id = match cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == OID_HW_ID)
    {
        None if kind == VekKind::Vcek => {
            return Err(VerifyError::MalformedTcbExtension(
                "VCEK has no hwID".into(),
            ));
        }
        None => None,
        Some(ext) => Some(hw_id(ext.value)?),
    };
    Ok(Vek {
        kind,
        generation,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        tcb,
        hw_id,
    })
}

/// hwID extension value: legacy certificates hold the 64 raw bytes, newer ones a DER
/// OCTET STRING of them (upstream `get_oid_octets`).
fn hw_id(value: &[u8]) -> Result<Vec<u8>, VerifyError> {
    if value.len() == 64 {
        return Ok(value.to_vec());
    }
    der::single(value)
        .filter(|t| t.tag == 0x04 && t.value.len() == 64)
        .map(|t| t.value.to_vec())
        .ok_or_else(|| VerifyError::MalformedTcbExtension("hwID is not 64 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_roots_chain_to_their_ark() {
        let all = load_embedded_roots().unwrap();
        for g in [Generation::Milan, Generation::Genoa, Generation::Turin] {
            let r = &all[&g];
            let ark = parse(&r.ark).unwrap();
            let cn = ark.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), format!("ARK-{g:?}"));
        }
        // Cross-generation signatures do not verify.
        let milan = &all[&Generation::Milan];
        let genoa = &all[&Generation::Genoa];
        assert!(verify_signed_by(&milan.ask, &genoa.ark).is_err());
    }

    #[test]
    fn hw_id_legacy_and_der() {
        assert_eq!(hw_id(&[7; 64]).unwrap(), vec![7; 64]);
        let mut der_form = vec![0x04, 0x40];
        der_form.extend_from_slice(&[7; 64]);
        assert_eq!(hw_id(&der_form).unwrap(), vec![7; 64]);
        assert!(matches!(
            hw_id(&[4, 2, 0, 0]),
            Err(VerifyError::MalformedTcbExtension(_))
        ));
    }
}
