//! TDX quote layout (v4 and v5), parsed without I/O for the claims; the signature chain is
//! checked by `dcap-qvl` on the same bytes.
//!
//! Layout (Intel TDX DCAP Quoting Library API, appendix 3/4):
//! - header, 48 bytes: version u16, attestation key type u16, TEE type u32 (0x81 = TDX),
//!   reserved 4, QE vendor id 16, user data 20;
//! - v4: TD report 1.0 body (584 bytes) right after the header;
//! - v5: body type u16 (2 = TD report 1.0, 3 = TD report 1.5), body size u32, then the body.
//!   A 1.5 body is the 1.0 body followed by TEE_TCB_SVN2 (16) and MRSERVICETD (48).

use crate::VerifyError;

const HEADER_LEN: usize = 48;
const TD10_LEN: usize = 584;
const TD15_LEN: usize = TD10_LEN + 16 + 48;
/// TEE type of a TDX quote.
pub const TEE_TYPE_TDX: u32 = 0x81;

/// The TD report fields the claims expose (offsets into a 1.0 body).
#[derive(Debug, Clone, Copy)]
pub struct TdBody<'a> {
    raw: &'a [u8],
}

/// Field name and (offset, length) within a TD report 1.0 body, in upstream's claim order.
pub const TD10_FIELDS: [(&str, usize, usize); 15] = [
    ("tcb_svn", 0, 16),
    ("mr_seam", 16, 48),
    ("mrsigner_seam", 64, 48),
    ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8),
    ("xfam", 128, 8),
    ("mr_td", 136, 48),
    ("mr_config_id", 184, 48),
    ("mr_owner", 232, 48),
    ("mr_owner_config", 280, 48),
    ("rtmr_0", 328, 48),
    ("rtmr_1", 376, 48),
    ("rtmr_2", 424, 48),
    ("rtmr_3", 472, 48),
    ("report_data", 520, 64),
];

impl<'a> TdBody<'a> {
    fn field(&self, offset: usize, len: usize) -> &'a [u8] {
        // Bodies are length-checked at parse time, so this range is always in bounds.
        self.raw.get(offset..offset + len).unwrap_or_default()
    }
    /// REPORTDATA (64 bytes).
    pub fn report_data(&self) -> &'a [u8] {
        self.field(520, 64)
    }
    /// MRCONFIGID (48 bytes): upstream's init-data binding.
    pub fn mr_config_id(&self) -> &'a [u8] {
        self.field(184, 48)
    }
    /// TDATTRIBUTES (8 bytes, little endian).
    pub fn td_attributes(&self) -> &'a [u8] {
        self.field(120, 8)
    }
    /// RTMR `i` (0..4).
    pub fn rtmr(&self, i: usize) -> &'a [u8] {
        self.field(328 + 48 * i, 48)
    }
    /// A named 1.0 field.
    pub fn named(&self, offset: usize, len: usize) -> &'a [u8] {
        self.field(offset, len)
    }
    /// TEE_TCB_SVN2 and MRSERVICETD of a 1.5 body.
    pub fn td15_extra(&self) -> Option<(&'a [u8], &'a [u8])> {
        (self.raw.len() >= TD15_LEN)
            .then(|| (self.field(TD10_LEN, 16), self.field(TD10_LEN + 16, 48)))
    }
}

/// A parsed TDX quote (borrowing the quote bytes).
#[derive(Debug, Clone, Copy)]
pub struct Quote<'a> {
    /// The 48-byte header.
    pub header: &'a [u8],
    /// Quote version: 4 or 5.
    pub version: u16,
    /// For v5: the raw body type (2 bytes) and body size (4 bytes), as in the quote.
    pub v5_type_size: Option<(&'a [u8], &'a [u8])>,
    /// The TD report body.
    pub body: TdBody<'a>,
    /// The signature data that follows the body (length-prefixed).
    pub signature_data: &'a [u8],
}

impl<'a> Quote<'a> {
    /// Parses the header and TD report body of a v4 or v5 TDX quote.
    pub fn parse(raw: &'a [u8]) -> Result<Self, VerifyError> {
        let short =
            || VerifyError::Malformed(format!("TDX quote is too short ({} bytes)", raw.len()));
        let header = raw.get(..HEADER_LEN).ok_or_else(short)?;
        let version = u16::from_le_bytes([header[0], header[1]]);
        let tee_type = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if tee_type != TEE_TYPE_TDX {
            return Err(VerifyError::Malformed(format!(
                "quote TEE type {tee_type:#x} is not TDX (0x81)"
            )));
        }
        let (v5_type_size, body_start, body_len) = match version {
            4 => (None, HEADER_LEN, TD10_LEN),
            5 => {
                let ts = raw.get(HEADER_LEN..HEADER_LEN + 6).ok_or_else(short)?;
                let body_type = u16::from_le_bytes([ts[0], ts[1]]);
                let size = u32::from_le_bytes([ts[2], ts[3], ts[4], ts[5]]) as usize;
                let expected = match body_type {
                    2 => TD10_LEN,
                    3 => TD15_LEN,
                    other => {
                        return Err(VerifyError::Malformed(format!(
                            "TDX quote v5 body type {other} is not a TD report (2 or 3)"
                        )));
                    }
                };
                if size != expected {
                    return Err(VerifyError::Malformed(format!(
                        "TDX quote v5 body size {size} does not match type {body_type}"
                    )));
                }
                (Some((&ts[..2], &ts[2..6])), HEADER_LEN + 6, size)
            }
            other => {
                return Err(VerifyError::Malformed(format!(
                    "TDX quote version {other} is not supported (4 or 5)"
                )));
            }
        };
        let body = raw
            .get(body_start..body_start + body_len)
            .ok_or_else(short)?;
        let signature_data = raw.get(body_start + body_len..).ok_or_else(short)?;
        Ok(Quote {
            header,
            version,
            v5_type_size,
            body: TdBody { raw: body },
            signature_data,
        })
    }

    /// Offset of the first byte after the signed part (header + body).
    pub fn signed_len(&self) -> usize {
        HEADER_LEN + self.v5_type_size.map_or(0, |_| 6) + self.body.raw.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v5() {
        let v4 = include_bytes!("../../testdata/tdx/tdx_quote_4.dat");
        let q = Quote::parse(v4).unwrap();
        assert_eq!(q.version, 4);
        assert!(q.v5_type_size.is_none());
        assert_eq!(q.signed_len(), 632);

        let v5 = include_bytes!("../../testdata/tdx/tdx_quote_5.dat");
        let q = Quote::parse(v5).unwrap();
        assert_eq!(q.version, 5);
        assert!(q.v5_type_size.is_some());
    }

    #[test]
    fn refuses_truncated_and_foreign_quotes() {
        let v4 = include_bytes!("../../testdata/tdx/tdx_quote_4.dat");
        assert!(matches!(
            Quote::parse(&v4[..100]),
            Err(VerifyError::Malformed(_))
        ));
        let mut sgx = v4.to_vec();
        sgx[4] = 0;
        assert!(matches!(Quote::parse(&sgx), Err(VerifyError::Malformed(_))));
    }
}
