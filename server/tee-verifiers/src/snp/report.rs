//! The SEV-SNP ATTESTATION_REPORT (SNP firmware ABI spec, table "ATTESTATION_REPORT
//! structure"), read from its 1184 raw bytes; the signature covers bytes 0..0x2A0.

use super::Generation;
use crate::VerifyError;
use crate::request::SnpTcb;

/// Length of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// Length of the signed part.
pub const SIGNED_LEN: usize = 0x2A0;

/// A report, borrowed from its raw bytes (length checked).
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    raw: &'a [u8],
}

impl<'a> Report<'a> {
    /// Wraps raw report bytes; exactly [`REPORT_LEN`] bytes are required.
    pub fn new(raw: &'a [u8]) -> Result<Self, VerifyError> {
        if raw.len() != REPORT_LEN {
            return Err(VerifyError::Malformed(format!(
                "SNP report is {} bytes, expected {REPORT_LEN}",
                raw.len()
            )));
        }
        Ok(Report { raw })
    }

    fn bytes(&self, offset: usize, len: usize) -> &'a [u8] {
        &self.raw[offset..offset + len]
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes([
            self.raw[offset],
            self.raw[offset + 1],
            self.raw[offset + 2],
            self.raw[offset + 3],
        ])
    }
    fn u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(offset, 8));
        u64::from_le_bytes(b)
    }

    /// The raw bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
    /// The signed bytes (0..0x2A0).
    pub fn signed(&self) -> &'a [u8] {
        &self.raw[..SIGNED_LEN]
    }
    /// VERSION.
    pub fn version(&self) -> u32 {
        self.u32(0x00)
    }
    /// GUEST_SVN.
    pub fn guest_svn(&self) -> u32 {
        self.u32(0x04)
    }
    /// POLICY.
    pub fn policy(&self) -> u64 {
        self.u64(0x08)
    }
    /// FAMILY_ID.
    pub fn family_id(&self) -> &'a [u8] {
        self.bytes(0x10, 16)
    }
    /// IMAGE_ID.
    pub fn image_id(&self) -> &'a [u8] {
        self.bytes(0x20, 16)
    }
    /// VMPL.
    pub fn vmpl(&self) -> u32 {
        self.u32(0x30)
    }
    /// SIGNATURE_ALGO (1 = ECDSA P-384 with SHA-384).
    pub fn sig_algo(&self) -> u32 {
        self.u32(0x34)
    }
    /// PLATFORM_INFO.
    pub fn plat_info(&self) -> u64 {
        self.u64(0x40)
    }
    /// KEY_INFO: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 2..4 SIGNING_KEY.
    pub fn key_info(&self) -> u32 {
        self.u32(0x48)
    }
    /// SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none.
    pub fn signing_key(&self) -> u32 {
        (self.key_info() >> 2) & 0x7
    }
    /// REPORT_DATA.
    pub fn report_data(&self) -> &'a [u8] {
        self.bytes(0x50, 64)
    }
    /// MEASUREMENT.
    pub fn measurement(&self) -> &'a [u8] {
        self.bytes(0x90, 48)
    }
    /// HOST_DATA: upstream's init-data binding.
    pub fn host_data(&self) -> &'a [u8] {
        self.bytes(0xC0, 32)
    }
    /// ID_KEY_DIGEST.
    pub fn id_key_digest(&self) -> &'a [u8] {
        self.bytes(0xE0, 48)
    }
    /// AUTHOR_KEY_DIGEST.
    pub fn author_key_digest(&self) -> &'a [u8] {
        self.bytes(0x110, 48)
    }
    /// REPORT_ID.
    pub fn report_id(&self) -> &'a [u8] {
        self.bytes(0x140, 32)
    }
    /// REPORT_ID_MA.
    pub fn report_id_ma(&self) -> &'a [u8] {
        self.bytes(0x160, 32)
    }
    /// CPUID family, model, stepping (version 3 and later).
    pub fn cpuid(&self) -> Option<(u8, u8, u8)> {
        (self.version() >= 3).then(|| (self.raw[0x188], self.raw[0x189], self.raw[0x18A]))
    }
    /// CHIP_ID.
    pub fn chip_id(&self) -> &'a [u8] {
        self.bytes(0x1A0, 64)
    }
    /// A TCB_VERSION field, decoded with the generation's layout.
    pub fn tcb(&self, offset: usize, generation: Generation) -> SnpTcb {
        let t = self.bytes(offset, 8);
        match generation {
            // Turin: FMC, bootloader, TEE, SNP, reserved x3, microcode.
            Generation::Turin => SnpTcb {
                fmc: Some(t[0]),
                bootloader: t[1],
                tee: t[2],
                snp: t[3],
                microcode: t[7],
            },
            // Milan, Genoa: bootloader, TEE, reserved x4, SNP, microcode.
            Generation::Milan | Generation::Genoa => SnpTcb {
                fmc: None,
                bootloader: t[0],
                tee: t[1],
                snp: t[6],
                microcode: t[7],
            },
        }
    }
    /// CURRENT_TCB.
    pub fn current_tcb(&self, g: Generation) -> SnpTcb {
        self.tcb(0x38, g)
    }
    /// REPORTED_TCB: the TCB the VCEK/VLEK is issued for.
    pub fn reported_tcb(&self, g: Generation) -> SnpTcb {
        self.tcb(0x180, g)
    }
    /// COMMITTED_TCB.
    pub fn committed_tcb(&self, g: Generation) -> SnpTcb {
        self.tcb(0x1E0, g)
    }
    /// LAUNCH_TCB.
    pub fn launch_tcb(&self, g: Generation) -> SnpTcb {
        self.tcb(0x1F0, g)
    }
    /// CURRENT_BUILD/MINOR/MAJOR as (major, minor, build).
    pub fn current_version(&self) -> (u8, u8, u8) {
        (self.raw[0x1EA], self.raw[0x1E9], self.raw[0x1E8])
    }
    /// COMMITTED_BUILD/MINOR/MAJOR as (major, minor, build).
    pub fn committed_version(&self) -> (u8, u8, u8) {
        (self.raw[0x1EE], self.raw[0x1ED], self.raw[0x1EC])
    }
    /// The signature as big-endian `r || s` (48 + 48 bytes), or `None` when a component does
    /// not fit in 48 bytes (the report stores each as 72 little-endian bytes).
    pub fn signature_fixed(&self) -> Option<[u8; 96]> {
        let mut out = [0u8; 96];
        for (i, offset) in [0x2A0usize, 0x2E8].iter().enumerate() {
            let le = self.bytes(*offset, 72);
            if le[48..].iter().any(|&b| b != 0) {
                return None;
            }
            for (j, b) in le[..48].iter().rev().enumerate() {
                out[48 * i + j] = *b;
            }
        }
        Some(out)
    }
}
