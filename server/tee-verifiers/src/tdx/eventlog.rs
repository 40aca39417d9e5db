//! The CC event log (CCEL ACPI table data, TCG crypto-agile format) a TDX attester sends as
//! `cc_eventlog`: parsed into upstream's `uefi_event_logs` claim and replayed against the
//! quote's RTMRs.
//!
//! Upstream: trustee `deps/eventlog/src/lib.rs` (entry layout, `replay_and_match`) and
//! `deps/eventlog/src/ccel/tcg_enum.rs` (event names, which parser fills `details`). Each entry
//! becomes `{index, type_name, digests: [{alg, digest(hex)}], event (base64 of the event
//! data), details, digest_matches_event}`; RTMR `i` is measurement register index `i + 1`.
//!
//! `details` is filled as upstream does for separators and blanks (`{}`),
//! EV_EFI_PLATFORM_FIRMWARE_BLOB2 / EV_EFI_HANDOFF_TABLES2 (`string`: the description) and
//! EV_PLATFORM_CONFIG_FLAGS (`string`: the UTF-8 text without control characters, `""` when
//! not UTF-8). Upstream's richer parsers (EFI variables, device paths, EV_IPL, EV_EVENT_TAG)
//! are not reproduced: those events get `details: {}` here.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use serde_json::{Map, Value, json};

use crate::VerifyError;

const EV_NO_ACTION: u32 = 0x3;

/// One parsed event log entry.
#[derive(Debug, Clone)]
pub struct Event {
    /// Measurement register index (RTMR i is index i + 1).
    pub index: u32,
    /// TCG event type.
    pub event_type: u32,
    /// (TCG algorithm id, digest).
    pub digests: Vec<(u16, Vec<u8>)>,
    /// Raw event data.
    pub data: Vec<u8>,
}

/// A parsed CC event log.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    /// Entries after the spec-id header event.
    pub events: Vec<Event>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VerifyError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            VerifyError::Malformed(format!("CC event log truncated at byte {}", self.pos))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, VerifyError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, VerifyError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn alg_name(alg: u16) -> Option<&'static str> {
    Some(match alg {
        0x1 => "RSA",
        0x3 => "TDES",
        0x4 => "SHA-1",
        0xB => "SHA-256",
        0xC => "SHA-384",
        0xD => "SHA-512",
        _ => return None,
    })
}

impl EventLog {
    /// Parses CCEL data: a TCG_PCClientPCREvent spec-id header (SHA-1 format) announcing the
    /// digest sizes, then crypto-agile TCG_PCR_EVENT2 entries until the end or padding
    /// (all-zero or all-0xff).
    pub fn parse(data: &[u8]) -> Result<Self, VerifyError> {
        let mut r = Reader { buf: data, pos: 0 };
        let _pcr = r.u32()?;
        let ty = r.u32()?;
        r.take(20)?;
        let size = r.u32()? as usize;
        let spec = r.take(size)?;
        if ty != EV_NO_ACTION {
            return Err(VerifyError::Malformed(
                "CC event log does not start with a spec-id event".into(),
            ));
        }
        let mut sizes = Vec::new();
        let mut s = Reader { buf: spec, pos: 24 };
        let count = s.u32()?;
        for _ in 0..count {
            let alg = s.u16()?;
            let len = s.u16()?;
            sizes.push((alg, len as usize));
        }
        let mut events = Vec::new();
        while r.pos + 8 <= data.len() {
            let marker = &data[r.pos..r.pos + 8];
            if marker.iter().all(|&b| b == 0) || marker.iter().all(|&b| b == 0xff) {
                break;
            }
            let index = r.u32()?;
            let event_type = r.u32()?;
            if type_name(event_type).is_none() {
                return Err(VerifyError::Malformed(format!(
                    "CC event log has unknown event type {event_type:#x}"
                )));
            }
            let n = r.u32()?;
            let mut digests = Vec::new();
            for _ in 0..n {
                let alg = r.u16()?;
                let len = sizes
                    .iter()
                    .find(|(a, _)| *a == alg)
                    .map(|(_, l)| *l)
                    .ok_or_else(|| {
                        VerifyError::Malformed(format!("CC event log: no size for alg {alg:#x}"))
                    })?;
                digests.push((alg, r.take(len)?.to_vec()));
            }
            let len = r.u32()? as usize;
            let data = r.take(len)?.to_vec();
            events.push(Event {
                index,
                event_type,
                digests,
                data,
            });
        }
        Ok(EventLog { events })
    }

    /// Replays the SHA-384 digests of register index `rtmr + 1` (upstream's `replay`).
    pub fn replay_rtmr(&self, rtmr: u32) -> Vec<u8> {
        let mut acc = vec![0u8; 48];
        for e in self.events.iter().filter(|e| e.index == rtmr + 1) {
            for (_, d) in e.digests.iter().filter(|(a, _)| *a == 0xC) {
                let mut ctx = digest::Context::new(&digest::SHA384);
                ctx.update(&acc);
                ctx.update(d);
                acc = ctx.finish().as_ref().to_vec();
            }
        }
        acc
    }

    /// Checks that replaying the log gives the quote's RTMR 0..3.
    pub fn check_rtmrs(&self, rtmrs: [&[u8]; 4]) -> Result<(), VerifyError> {
        for (i, expected) in rtmrs.iter().enumerate() {
            let replayed = self.replay_rtmr(i as u32);
            if replayed != *expected {
                return Err(VerifyError::EventLogMismatch(format!(
                    "RTMR[{i}] replays to {}, the quote has {}",
                    hex::encode(&replayed),
                    hex::encode(expected)
                )));
            }
        }
        Ok(())
    }

    /// Upstream's `uefi_event_logs` claim.
    pub fn to_claims(&self) -> Value {
        Value::Array(self.events.iter().map(event_claim).collect())
    }
}

fn event_claim(e: &Event) -> Value {
    let digests: Vec<Value> = e
        .digests
        .iter()
        .map(|(alg, d)| json!({"alg": alg_name(*alg).unwrap_or("unknown"), "digest": hex::encode(d)}))
        .collect();
    json!({
        "index": e.index,
        "type_name": type_name(e.event_type).unwrap_or("unknown"),
        "digests": digests,
        "event": STANDARD.encode(&e.data),
        "details": Value::Object(details(e.event_type, &e.data)),
        "digest_matches_event": digest_matches(e),
    })
}

/// True when every digest of the entry is the hash of its event data (upstream's
/// `digest_matches_event`; false for events that measure something other than their data).
fn digest_matches(e: &Event) -> bool {
    !e.digests.is_empty()
        && e.digests.iter().all(|(alg, d)| {
            let algo = match alg {
                0xB => &digest::SHA256,
                0xC => &digest::SHA384,
                0xD => &digest::SHA512,
                _ => return false,
            };
            digest::digest(algo, &e.data).as_ref() == d.as_slice()
        })
}

fn details(event_type: u32, data: &[u8]) -> Map<String, Value> {
    let mut m = Map::new();
    match event_type {
        // EV_PLATFORM_CONFIG_FLAGS: implementation specific text (td-shim kernel cmdline).
        0xA => {
            let text = std::str::from_utf8(data)
                .unwrap_or_default()
                .replace('\u{10}', " ");
            let cleaned: String = text.chars().filter(|c| !c.is_control()).collect();
            m.insert("string".into(), Value::String(cleaned));
        }
        // EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_EFI_HANDOFF_TABLES2: a length-prefixed
        // description. Upstream takes bytes 1..len (the size byte counts itself).
        0x8000_000A | 0x8000_000B => {
            if let Some(&len) = data.first()
                && let Some(Ok(s)) = data.get(1..(len as usize).max(1)).map(std::str::from_utf8)
            {
                m.insert("string".into(), Value::String(s.to_owned()));
            }
        }
        _ => {}
    }
    m
}

/// TCG event types and names (trustee `deps/eventlog/src/ccel/tcg_enum.rs`).
const EVENT_TYPES: [(u32, &str); 36] = [
    (0x0, "EV_PREBOOT_CERT"),
    (0x1, "EV_POST_CODE"),
    (0x2, "EV_UNUSED"),
    (0x3, "EV_NO_ACTION"),
    (0x4, "EV_SEPARATOR"),
    (0x5, "EV_ACTION"),
    (0x6, "EV_EVENT_TAG"),
    (0x7, "EV_S_CRTM_CONTENTS"),
    (0x8, "EV_S_CRTM_VERSION"),
    (0x9, "EV_CPU_MICROCODE"),
    (0xA, "EV_PLATFORM_CONFIG_FLAGS"),
    (0xB, "EV_TABLE_OF_DEVICES"),
    (0xC, "EV_COMPACT_HASH"),
    (0xD, "EV_IPL"),
    (0xE, "EV_IPL_PARTITION_DATA"),
    (0xF, "EV_NONHOST_CODE"),
    (0x10, "EV_NONHOST_CONFIG"),
    (0x11, "EV_NONHOST_INFO"),
    (0x12, "EV_OMIT_BOOT_DEVICE_EVENTS"),
    (0x8000_0000, "EV_EFI_EVENT_BASE"),
    (0x8000_0001, "EV_EFI_VARIABLE_DRIVER_CONFIG"),
    (0x8000_0002, "EV_EFI_VARIABLE_BOOT"),
    (0x8000_0003, "EV_EFI_BOOT_SERVICES_APPLICATION"),
    (0x8000_0004, "EV_EFI_BOOT_SERVICES_DRIVER"),
    (0x8000_0005, "EV_EFI_RUNTIME_SERVICES_DRIVER"),
    (0x8000_0006, "EV_EFI_GPT_EVENT"),
    (0x8000_0007, "EV_EFI_ACTION"),
    (0x8000_0008, "EV_EFI_PLATFORM_FIRMWARE_BLOB"),
    (0x8000_0009, "EV_EFI_HANDOFF_TABLES"),
    (0x8000_000A, "EV_EFI_PLATFORM_FIRMWARE_BLOB2"),
    (0x8000_000B, "EV_EFI_HANDOFF_TABLES2"),
    (0x8000_000C, "EV_EFI_VARIABLE_BOOT2"),
    (0x8000_0010, "EV_EFI_HCRTM_EVENT"),
    (0x8000_00E0, "EV_EFI_VARIABLE_AUTHORITY"),
    (0x8000_00E1, "EV_EFI_SPDM_FIRMWARE_BLOB"),
    (0x8000_00E2, "EV_EFI_SPDM_FIRMWARE_CONFIG"),
];

/// The name of a TCG event type.
pub fn type_name(t: u32) -> Option<&'static str> {
    EVENT_TYPES.iter().find(|(c, _)| *c == t).map(|(_, n)| *n)
}

/// The TCG event type with this name.
pub fn type_code(name: &str) -> Option<u32> {
    EVENT_TYPES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(c, _)| *c)
}

/// Builds CCEL bytes from events (test fixtures; the inverse of [`EventLog::parse`]).
pub fn encode(events: &[Event]) -> Vec<u8> {
    let mut spec = Vec::new();
    spec.extend_from_slice(b"Spec ID Event03\0");
    spec.extend_from_slice(&0u32.to_le_bytes()); // platform class
    spec.extend_from_slice(&[0, 2, 2, 2]); // spec version minor/major/errata, uintn size
    spec.extend_from_slice(&1u32.to_le_bytes());
    spec.extend_from_slice(&0xCu16.to_le_bytes());
    spec.extend_from_slice(&48u16.to_le_bytes());
    spec.push(0); // vendor info size
    let mut out = Vec::new();
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
    out.extend_from_slice(&[0; 20]);
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    for e in events {
        out.extend_from_slice(&e.index.to_le_bytes());
        out.extend_from_slice(&e.event_type.to_le_bytes());
        out.extend_from_slice(&(e.digests.len() as u32).to_le_bytes());
        for (alg, d) in &e.digests {
            out.extend_from_slice(&alg.to_le_bytes());
            out.extend_from_slice(d);
        }
        out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.data);
    }
    out.extend_from_slice(&[0xff; 16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_replay() {
        let sep = vec![0u8; 4];
        let d = digest::digest(&digest::SHA384, &sep).as_ref().to_vec();
        let ev = Event {
            index: 1,
            event_type: 4,
            digests: vec![(0xC, d.clone())],
            data: sep,
        };
        let log = EventLog::parse(&encode(&[ev])).unwrap();
        assert_eq!(log.events.len(), 1);
        let claims = log.to_claims();
        assert_eq!(claims[0]["type_name"], "EV_SEPARATOR");
        assert_eq!(claims[0]["digest_matches_event"], true);
        let mut ctx = digest::Context::new(&digest::SHA384);
        ctx.update(&[0u8; 48]);
        ctx.update(&d);
        let rtmr0 = ctx.finish().as_ref().to_vec();
        assert!(
            log.check_rtmrs([&rtmr0, &[0; 48], &[0; 48], &[0; 48]])
                .is_ok()
        );
        assert!(matches!(
            log.check_rtmrs([&[0; 48], &[0; 48], &[0; 48], &[0; 48]]),
            Err(VerifyError::EventLogMismatch(_))
        ));
    }

    #[test]
    fn truncated_log_is_malformed() {
        assert!(matches!(
            EventLog::parse(&[1, 2, 3]),
            Err(VerifyError::Malformed(_))
        ));
    }
}
