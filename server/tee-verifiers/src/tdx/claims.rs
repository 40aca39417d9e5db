//! The claims upstream's TDX verifier derives from a quote and its event log, under the same
//! names, so resource policies written for Trustee run unchanged.
//!
//! Upstream: trustee `deps/verifier/src/tdx/claims.rs` (`generate_parsed_claim`), checked
//! against `deps/verifier/test_data/parse_tdx_claims_expected.json` (made from
//! `tdx_quote_4.dat` and `CCEL_data`):
//!
//! ```text
//! quote.header.{version, att_key_type, tee_type, reserved, vendor_id, user_data}   hex
//! quote.body.{tcb_svn, mr_seam, mrsigner_seam, seam_attributes, td_attributes, xfam,
//!             mr_td, mr_config_id, mr_owner, mr_owner_config, rtmr_0..rtmr_3,
//!             report_data}                                                          hex
//! quote.body.{tee_tcb_svn2, mr_servicetd}           (v5 with a TD 1.5 body only)    hex
//! quote.{type, size}                                (v5 only; raw little-endian)    hex
//! td_attributes.{debug, key_locker, perfmon, protection_keys, septve_disable}       bool
//! report_data, init_data (= MRCONFIGID)                                             hex
//! uefi_event_logs                                   (when a CC event log was sent)
//! platform_instance_id                              (PCK cert platformInstanceId, when
//!                                                    present; byte order reversed)  hex
//! ```
//!
//! After a successful DCAP verification the verifier adds `tcb_status` (UpToDate,
//! SWHardeningNeeded, ConfigurationNeeded, ConfigurationAndSWHardeningNeeded, OutOfDate,
//! OutOfDateConfigurationNeeded, TDRelaunchAdvised...) and `advisory_ids` (Intel-SA-xxxxx),
//! as upstream's `extend_using_custom_claims` does, plus the collateral dates.

use serde_json::{Map, Value};

use super::eventlog::EventLog;
use super::quote::{Quote, TD10_FIELDS};

/// TD attribute bits upstream names (lower-cased bitflags names).
const TD_ATTRIBUTES: [(&str, u32); 5] = [
    ("debug", 0),
    ("septve_disable", 28),
    ("protection_keys", 30),
    ("key_locker", 31),
    ("perfmon", 63),
];

fn hex_value(b: &[u8]) -> Value {
    Value::String(hex::encode(b))
}

/// Claims parsed from the quote (and event log) alone, before any verification result.
pub fn parsed_claims(
    quote: &Quote<'_>,
    eventlog: Option<&EventLog>,
    platform_instance_id: Option<&[u8]>,
) -> Map<String, Value> {
    let h = quote.header;
    let mut header = Map::new();
    header.insert("version".into(), hex_value(&h[0..2]));
    header.insert("att_key_type".into(), hex_value(&h[2..4]));
    header.insert("tee_type".into(), hex_value(&h[4..8]));
    header.insert("reserved".into(), hex_value(&h[8..12]));
    header.insert("vendor_id".into(), hex_value(&h[12..28]));
    header.insert("user_data".into(), hex_value(&h[28..48]));

    let mut body = Map::new();
    for (name, offset, len) in TD10_FIELDS {
        body.insert(name.into(), hex_value(quote.body.named(offset, len)));
    }
    if let Some((svn2, servicetd)) = quote.body.td15_extra() {
        body.insert("tee_tcb_svn2".into(), hex_value(svn2));
        body.insert("mr_servicetd".into(), hex_value(servicetd));
    }

    let mut q = Map::new();
    q.insert("header".into(), Value::Object(header));
    q.insert("body".into(), Value::Object(body));
    if let Some((ty, size)) = quote.v5_type_size {
        q.insert("type".into(), hex_value(ty));
        q.insert("size".into(), hex_value(size));
    }

    let attrs = quote.body.td_attributes();
    let bits = u64::from_le_bytes(attrs.try_into().unwrap_or([0; 8]));
    let td_attributes: Map<String, Value> = TD_ATTRIBUTES
        .iter()
        .map(|(name, bit)| ((*name).into(), Value::Bool(bits & (1u64 << bit) != 0)))
        .collect();

    let mut claims = Map::new();
    if let Some(log) = eventlog {
        claims.insert("uefi_event_logs".into(), log.to_claims());
    }
    claims.insert("quote".into(), Value::Object(q));
    claims.insert("td_attributes".into(), Value::Object(td_attributes));
    claims.insert("report_data".into(), hex_value(quote.body.report_data()));
    claims.insert("init_data".into(), hex_value(quote.body.mr_config_id()));
    if let Some(id) = platform_instance_id {
        let mut reversed = id.to_vec();
        reversed.reverse();
        claims.insert("platform_instance_id".into(), hex_value(&reversed));
    }
    claims
}
