//! Minimal DER reading for vendor certificate extensions (Intel SGX/TDX PCK, AMD VCEK/VLEK),
//! whose contents x509-parser hands over as raw bytes.

/// One DER element: tag byte and content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// Identifier octet (single-byte tags only).
    pub tag: u8,
    /// Content octets.
    pub value: &'a [u8],
}

/// Splits the first DER element off `input`; `None` if it is not well formed.
pub fn next(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in these extensions
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (len0 as usize, rest)
    } else {
        let n = (len0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((
        Tlv {
            tag,
            value: &rest[..len],
        },
        &rest[len..],
    ))
}

/// The single DER element making up all of `input`.
pub fn single(input: &[u8]) -> Option<Tlv<'_>> {
    match next(input)? {
        (tlv, []) => Some(tlv),
        _ => None,
    }
}

/// Iterates over the elements of a constructed value.
pub fn elements(mut input: &[u8]) -> impl Iterator<Item = Option<Tlv<'_>>> {
    std::iter::from_fn(move || {
        if input.is_empty() {
            return None;
        }
        match next(input) {
            Some((tlv, rest)) => {
                input = rest;
                Some(Some(tlv))
            }
            None => {
                input = &[];
                Some(None)
            }
        }
    })
}

/// A DER INTEGER holding a small unsigned value (at most 8 content bytes, non-negative).
pub fn small_uint(tlv: Tlv<'_>) -> Option<u64> {
    if tlv.tag != 0x02 || tlv.value.is_empty() || tlv.value.len() > 9 || tlv.value[0] & 0x80 != 0 {
        return None;
    }
    // DER: a leading zero only when the next byte's top bit is set.
    if tlv.value.len() > 1 && tlv.value[0] == 0 && tlv.value[1] & 0x80 == 0 {
        return None;
    }
    let v = tlv
        .value
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | b as u128);
    u64::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_der() {
        assert_eq!(single(&[2, 1, 3]).and_then(small_uint), Some(3));
        assert_eq!(single(&[2, 2, 0, 0xa9]).and_then(small_uint), Some(0xa9));
        assert_eq!(single(&[2, 1, 0x80]).and_then(small_uint), None); // negative
        assert_eq!(single(&[2, 2, 0, 1]).and_then(small_uint), None); // not minimal
        assert_eq!(single(&[2, 2, 0]), None); // truncated
        assert_eq!(single(&[4, 1, 0, 9]), None); // trailing bytes
    }
}
