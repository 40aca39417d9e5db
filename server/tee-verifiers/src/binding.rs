//! Binding of the evidence to this session (report data) and to the init-data (MRCONFIGID,
//! HOST_DATA), compared exactly as upstream Trustee does.
//!
//! Upstream (`deps/verifier/src/lib.rs`, `regularize_data`) first brings the expected value to
//! the width of the evidence field, then compares the whole field byte for byte:
//!
//! - shorter than the field: zero-padded at the end (a SHA-256 or SHA-384 runtime-data digest
//!   in the 64-byte REPORT_DATA; a SHA-256 init-data digest in the 48-byte MRCONFIGID);
//! - longer than the field: truncated to the field's width (a SHA-384 init-data digest against
//!   SNP's 32-byte HOST_DATA compares its first 32 bytes; a SHA-512 digest against TDX's
//!   48-byte MRCONFIGID its first 48 bytes);
//! - equal: compared as is.
//!
//! So the evidence field must *start with* the expected digest and be zero after it; bytes
//! after the digest that are not zero are a mismatch (the attester zero-pads, upstream's
//! `pad()` in guest-components does the same).

use crate::VerifyError;

/// `expected` padded with zeros or truncated to `width` bytes (upstream's `regularize_data`).
pub fn regularize(expected: &[u8], width: usize) -> Vec<u8> {
    let mut v = expected[..expected.len().min(width)].to_vec();
    v.resize(width, 0);
    v
}

/// Checks the evidence's report data against the expected runtime-data digest.
pub fn check_report_data(actual: &[u8], expected: &[u8]) -> Result<(), VerifyError> {
    if ring_eq(&regularize(expected, actual.len()), actual) {
        Ok(())
    } else {
        Err(VerifyError::ReportDataMismatch)
    }
}

/// Checks MRCONFIGID/HOST_DATA against the init-data digest, when one was sent.
pub fn check_init_data(actual: &[u8], expected: Option<&[u8]>) -> Result<(), VerifyError> {
    match expected {
        None => Ok(()),
        Some(expected) if ring_eq(&regularize(expected, actual.len()), actual) => Ok(()),
        Some(_) => Err(VerifyError::InitDataMismatch),
    }
}

fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_digest_is_zero_padded() {
        let mut field = [0u8; 64];
        field[..48].copy_from_slice(&[7; 48]);
        assert!(check_report_data(&field, &[7; 48]).is_ok());
        field[60] = 1;
        assert_eq!(
            check_report_data(&field, &[7; 48]),
            Err(VerifyError::ReportDataMismatch)
        );
    }

    #[test]
    fn longer_digest_is_truncated() {
        // SHA-384 init-data digest against SNP's 32-byte HOST_DATA.
        let digest: Vec<u8> = (0..48).collect();
        let host_data: Vec<u8> = (0..32).collect();
        assert!(check_init_data(&host_data, Some(&digest)).is_ok());
        assert!(check_init_data(&host_data, None).is_ok());
        assert_eq!(
            check_init_data(&[0; 32], Some(&digest)),
            Err(VerifyError::InitDataMismatch)
        );
    }
}
