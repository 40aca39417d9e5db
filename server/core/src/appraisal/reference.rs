//! Reference values: names, and values checked and brought to the form the claims have,
//! so a typo fails when the operator sets it rather than as a mysterious mismatch later.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Most values under one name.
const MAX_VALUES: usize = 256;
/// Longest value, bytes.
const MAX_VALUE_LEN: usize = 1024;
/// Longest name.
const MAX_NAME_LEN: usize = 64;

/// How a known reference value is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Hex of exactly this many bytes, stored lower case.
    Hex(usize),
    /// Hex of one of these digest sizes.
    HexDigest,
    /// 48 bytes, given as hex or standard base64, stored as base64 (as SNP claims have it).
    Base64Of48,
    /// An integer in 0..=255.
    Svn,
    /// `true` or `false`.
    Switch,
}

/// The reference values the default appraisal policy reads, with what each checks.
pub const KNOWN_REFERENCE_VALUES: &[(&str, &str)] = &[
    (
        "mr_td",
        "TDX: MRTD, the TD's initial memory (firmware), 48 bytes hex",
    ),
    (
        "rtmr_0",
        "TDX: RTMR0 (firmware configuration), 48 bytes hex",
    ),
    ("rtmr_1", "TDX: RTMR1 (bootloader, kernel), 48 bytes hex"),
    (
        "rtmr_2",
        "TDX: RTMR2 (kernel command line, initrd), 48 bytes hex",
    ),
    ("rtmr_3", "TDX: RTMR3 (runtime measurements), 48 bytes hex"),
    ("mr_seam", "TDX: MRSEAM, the TDX module, 48 bytes hex"),
    ("tcb_svn", "TDX: TEE_TCB_SVN, 16 bytes hex"),
    (
        "measurement",
        "SNP: launch MEASUREMENT, 48 bytes hex or base64",
    ),
    (
        "snp_min_bootloader",
        "SNP: minimum reported TCB bootloader SPL, 0..=255",
    ),
    (
        "snp_min_tee",
        "SNP: minimum reported TCB PSP OS (tee) SPL, 0..=255",
    ),
    (
        "snp_min_snp",
        "SNP: minimum reported TCB SNP firmware SPL, 0..=255",
    ),
    (
        "snp_min_microcode",
        "SNP: minimum reported TCB microcode SPL, 0..=255",
    ),
    (
        "snp_min_fmc",
        "SNP (Turin): minimum reported TCB FMC SPL, 0..=255",
    ),
    (
        "init_data",
        "the init-data digest (hex of SHA-256, -384 or -512)",
    ),
    (
        "allow_outdated_tcb",
        "switch: an out-of-date TCB is a warning, not a refusal",
    ),
    (
        "allow_debug",
        "switch: a debug TD / SNP guest is a warning, not a refusal",
    ),
];

fn form(name: &str) -> Option<Form> {
    Some(match name {
        "mr_td" | "rtmr_0" | "rtmr_1" | "rtmr_2" | "rtmr_3" | "mr_seam" | "mr_config_id" => {
            Form::Hex(48)
        }
        "tcb_svn" => Form::Hex(16),
        "measurement" => Form::Base64Of48,
        "init_data" => Form::HexDigest,
        "allow_outdated_tcb" | "allow_debug" => Form::Switch,
        n if n.starts_with("snp_min_") => Form::Svn,
        _ => return None,
    })
}

/// Why a reference value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ReferenceValueError(pub String);

/// A name is 1..=64 characters of `[a-z0-9_]`, starting with a letter (a Rego identifier,
/// so a policy reads it as `data.reference.<name>`).
pub fn validate_name(name: &str) -> Result<(), ReferenceValueError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ReferenceValueError(format!(
            "reference value name {:?} must be 1..={MAX_NAME_LEN} characters of [a-z0-9_] starting with a letter",
            truncate(name)
        )))
    }
}

/// Checks `values` for `name` and brings each to the form the claims have (hex lower case,
/// SNP measurement in base64). Names the default policy does not know take any printable
/// text.
pub fn normalize(name: &str, values: &[String]) -> Result<Vec<String>, ReferenceValueError> {
    validate_name(name)?;
    if values.is_empty() {
        return Err(ReferenceValueError(format!(
            "{name}: at least one value (delete the name to remove it)"
        )));
    }
    if values.len() > MAX_VALUES {
        return Err(ReferenceValueError(format!(
            "{name}: {} values, at most {MAX_VALUES}",
            values.len()
        )));
    }
    let mut out = Vec::with_capacity(values.len());
    for value in values {
        let v = value.trim();
        if v.is_empty() || v.len() > MAX_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(ReferenceValueError(format!(
                "{name}: values are 1..={MAX_VALUE_LEN} bytes of printable text"
            )));
        }
        let normalized = match form(name) {
            None => v.to_owned(),
            Some(Form::Hex(len)) => hex_of(name, v, &[len])?,
            Some(Form::HexDigest) => hex_of(name, v, &[32, 48, 64])?,
            Some(Form::Base64Of48) => base64_of_48(name, v)?,
            Some(Form::Svn) => match v.parse::<u8>() {
                Ok(n) => n.to_string(),
                Err(_) => {
                    return Err(ReferenceValueError(format!(
                        "{name}: {:?} is not an integer in 0..=255",
                        truncate(v)
                    )));
                }
            },
            Some(Form::Switch) => match v.to_ascii_lowercase().as_str() {
                s @ ("true" | "false") => s.to_owned(),
                _ => {
                    return Err(ReferenceValueError(format!(
                        "{name}: a switch is `true` or `false`"
                    )));
                }
            },
        };
        if !out.contains(&normalized) {
            out.push(normalized);
        }
    }
    Ok(out)
}

fn hex_of(name: &str, v: &str, lens: &[usize]) -> Result<String, ReferenceValueError> {
    let lower = v.to_ascii_lowercase();
    match hex::decode(&lower) {
        Ok(bytes) if lens.contains(&bytes.len()) => Ok(lower),
        _ => {
            let sizes: Vec<String> = lens.iter().map(|l| format!("{}", l * 2)).collect();
            Err(ReferenceValueError(format!(
                "{name}: {:?} is not {} hex digits",
                truncate(v),
                sizes.join(" or ")
            )))
        }
    }
}

fn base64_of_48(name: &str, v: &str) -> Result<String, ReferenceValueError> {
    if v.len() == 96
        && let Ok(bytes) = hex::decode(v)
    {
        return Ok(STANDARD.encode(bytes));
    }
    match STANDARD.decode(v) {
        Ok(bytes) if bytes.len() == 48 => Ok(STANDARD.encode(bytes)),
        _ => Err(ReferenceValueError(format!(
            "{name}: {:?} is neither 96 hex digits nor the standard base64 of 48 bytes",
            truncate(v)
        ))),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_rego_identifiers() {
        assert!(validate_name("mr_td").is_ok());
        assert!(validate_name("custom_1").is_ok());
        for bad in ["", "1abc", "Mr_td", "a-b", "a.b", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn known_values_are_checked_and_normalized() {
        let mr = "AB".repeat(48);
        assert_eq!(
            normalize("mr_td", &[mr.clone(), mr.to_lowercase()]).unwrap(),
            vec!["ab".repeat(48)]
        );
        assert!(normalize("mr_td", &["ab".repeat(47)]).is_err());
        assert!(normalize("rtmr_2", &["zz".repeat(48)]).is_err());
        let m = normalize("measurement", &["01".repeat(48)]).unwrap();
        assert_eq!(STANDARD.decode(&m[0]).unwrap(), vec![1u8; 48]);
        assert_eq!(normalize("measurement", &m).unwrap(), m);
        assert!(normalize("measurement", &["AAAA".into()]).is_err());
        assert_eq!(normalize("snp_min_snp", &["08".into()]).unwrap(), ["8"]);
        assert!(normalize("snp_min_snp", &["256".into()]).is_err());
        assert_eq!(
            normalize("allow_debug", &["TRUE".into()]).unwrap(),
            ["true"]
        );
        assert!(normalize("allow_debug", &["yes".into()]).is_err());
        assert!(normalize("init_data", &["ab".repeat(48)]).is_ok());
        assert!(normalize("init_data", &["ab".repeat(20)]).is_err());
        assert_eq!(
            normalize("custom", &["any text".into()]).unwrap(),
            ["any text"]
        );
        assert!(normalize("custom", &[]).is_err());
        assert!(normalize("custom", &["a\nb".into()]).is_err());
    }
}
