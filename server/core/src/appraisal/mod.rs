//! Appraisal: from the verified evidence claims and the operator's reference values to an
//! EAR appraisal (`ear.status`, `ear.trustworthiness-vector`), by a replaceable Rego policy
//! with upstream's attestation-policy conventions (trustee `attestation-service`,
//! `ear_broker.rs` and `ear_default_policy_cpu.rego`):
//!
//! - `input` is the annotated evidence of one attestation (`input.tdx`, `input.snp`,
//!   `input.sample`, `input.init_data`, `input.runtime_data_claims`, ...);
//! - `data.reference` maps each reference value name to its list of accepted values;
//! - each defined rule named after a trust claim (`hardware`, `executables`, ...) sets that
//!   claim; the status is the worst tier among the claims set (AR4SI: 0/1 none, 2..31
//!   affirming, 32..95 warning, 96..127 contraindicated, and the same for negative values);
//! - a policy must set at least one claim.
//!
//! Tether adds an optional `reasons` set of strings, shown in logs and refusals (so read only
//! when the verdict is not affirming). A contraindicated appraisal is refused by the RCAR
//! service (no token is issued).

mod reference;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use serde_json::{Map, Value, json};

pub use reference::{KNOWN_REFERENCE_VALUES, ReferenceValueError, normalize, validate_name};

/// The default appraisal policy.
pub const DEFAULT_APPRAISAL_POLICY: &str = include_str!("default.rego");
/// The policy id put in tokens (`ear.appraisal-policy-id`), as upstream names its default.
pub const APPRAISAL_POLICY_ID: &str = "default";

/// Module name of the policy (appears in compile errors).
const MODULE_PATH: &str = "appraisal.rego";
/// A runaway policy is cut off after this long.
const EVAL_TIME_LIMIT: Duration = Duration::from_secs(1);
/// At most this many reasons are kept (a policy could produce many).
const MAX_REASONS: usize = 16;

/// The EAR trust claims: the Rego rule name and the name in the token.
pub const TRUST_CLAIMS: [(&str, &str); 8] = [
    ("instance_identity", "instance-identity"),
    ("configuration", "configuration"),
    ("executables", "executables"),
    ("file_system", "file-system"),
    ("hardware", "hardware"),
    ("runtime_opaque", "runtime-opaque"),
    ("storage_opaque", "storage-opaque"),
    ("sourced_data", "sourced-data"),
];

/// An AR4SI trustworthiness tier, the `ear.status` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrustTier {
    /// No claim.
    None,
    /// Affirming.
    Affirming,
    /// Warning.
    Warning,
    /// Contraindicated: no token is issued.
    Contraindicated,
}

impl TrustTier {
    /// The tier of a claim value (rust-ear `TrustClaim::tier`).
    pub fn of(value: i8) -> Self {
        if (-1..=1).contains(&value) {
            TrustTier::None
        } else if (-32..32).contains(&value) {
            TrustTier::Affirming
        } else if (-96..96).contains(&value) {
            TrustTier::Warning
        } else {
            TrustTier::Contraindicated
        }
    }

    /// The `ear.status` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            TrustTier::None => "none",
            TrustTier::Affirming => "affirming",
            TrustTier::Warning => "warning",
            TrustTier::Contraindicated => "contraindicated",
        }
    }
}

/// What the appraisal policy concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appraisal {
    /// The worst tier among the claims set.
    pub status: TrustTier,
    /// The claims set, by their EAR names (`hardware`, `file-system`, ...).
    pub trust_vector: BTreeMap<&'static str, i8>,
    /// The policy's id (`ear.appraisal-policy-id`).
    pub policy_id: &'static str,
    /// The policy's `reasons`, sorted; evaluated only when the status is not affirming
    /// (they explain refusals and warnings, and an affirming verdict is not reported).
    pub reasons: Vec<String>,
}

impl Appraisal {
    /// True when no token may be issued.
    pub fn is_refused(&self) -> bool {
        self.status == TrustTier::Contraindicated
    }

    /// `ear.trustworthiness-vector` as JSON.
    pub fn trust_vector_json(&self) -> Value {
        Value::Object(
            self.trust_vector
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect(),
        )
    }

    /// One line for logs and refusals: `contraindicated (hardware=96, ...): reason; reason`.
    pub fn summary(&self) -> String {
        let vector: Vec<String> = self
            .trust_vector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut text = format!("{} ({})", self.status.as_str(), vector.join(", "));
        if !self.reasons.is_empty() {
            text.push_str(": ");
            text.push_str(&self.reasons.join("; "));
        }
        text
    }
}

/// Appraisal errors.
#[derive(Debug, thiserror::Error)]
pub enum AppraisalError {
    /// The Rego does not compile, is not `package policy`, or sets no trust claim.
    #[error("appraisal policy does not compile: {0}")]
    Compile(String),
    /// Evaluation failed (a runtime error, a claim value that is not an integer in -128..=127,
    /// no claim set).
    #[error("appraisal policy evaluation failed: {0}")]
    Evaluation(String),
}

impl AppraisalError {
    /// HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            AppraisalError::Compile(_) => 400,
            AppraisalError::Evaluation(_) => 500,
        }
    }

    /// CamelCase error name for the JSON error type URL.
    pub fn name(&self) -> &'static str {
        match self {
            AppraisalError::Compile(_) => "AppraisalPolicyCompile",
            AppraisalError::Evaluation(_) => "AppraisalPolicyEvaluation",
        }
    }
}

/// One compiled policy version with the reference values merged in.
struct Loaded {
    version: u64,
    source: String,
    /// Compiled, without data.
    engine: regorus::Engine,
    /// The trust-claim rules the policy declares (Rego names), and whether it has `reasons`.
    rules: Vec<(&'static str, &'static str)>,
    has_reasons: bool,
    /// `engine` with `data.reference` merged (rebuilt when the reference values change).
    prepared: regorus::Engine,
}

/// The appraisal policy in force and the reference values it reads; safe to use from many
/// tasks while either is replaced.
pub struct Appraiser {
    current: RwLock<Arc<Loaded>>,
    reference: RwLock<Arc<BTreeMap<String, Vec<String>>>>,
    /// Serialises replacements so a policy and a reference update do not lose each other.
    write: Mutex<()>,
}

impl std::fmt::Debug for Appraiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appraiser")
            .field("version", &self.load().version)
            .finish_non_exhaustive()
    }
}

impl Default for Appraiser {
    fn default() -> Self {
        // The built-in policy compiles (a unit test says so); if it ever did not, an
        // appraiser whose every evaluation fails is safer than a panic.
        Self::new(DEFAULT_APPRAISAL_POLICY, BTreeMap::new()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the built-in appraisal policy does not compile");
            Self {
                current: RwLock::new(Arc::new(Loaded {
                    version: 1,
                    source: String::new(),
                    engine: regorus::Engine::new(),
                    rules: Vec::new(),
                    has_reasons: false,
                    prepared: regorus::Engine::new(),
                })),
                reference: RwLock::default(),
                write: Mutex::new(()),
            }
        })
    }
}

impl Appraiser {
    /// Compiles `rego` as version 1, with `reference` values.
    pub fn new(
        rego: &str,
        reference: BTreeMap<String, Vec<String>>,
    ) -> Result<Self, AppraisalError> {
        let (engine, rules, has_reasons) = compile(rego)?;
        let prepared = prepare(&engine, &reference, &rules, has_reasons)?;
        Ok(Self {
            current: RwLock::new(Arc::new(Loaded {
                version: 1,
                source: rego.to_owned(),
                engine,
                rules,
                has_reasons,
                prepared,
            })),
            reference: RwLock::new(Arc::new(reference)),
            write: Mutex::new(()),
        })
    }

    /// Checks that `rego` compiles as an appraisal policy, without installing it.
    pub fn check(rego: &str) -> Result<(), AppraisalError> {
        compile(rego).map(|_| ())
    }

    /// Replaces the policy if `rego` compiles (the old one stays otherwise); returns the
    /// in-memory version.
    pub fn set_policy(&self, rego: &str) -> Result<u64, AppraisalError> {
        let (engine, rules, has_reasons) = compile(rego)?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let prepared = prepare(&engine, &self.reference(), &rules, has_reasons)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let version = current.version + 1;
        *current = Arc::new(Loaded {
            version,
            source: rego.to_owned(),
            engine,
            rules,
            has_reasons,
            prepared,
        });
        Ok(version)
    }

    /// Replaces the reference values.
    pub fn set_reference_values(
        &self,
        reference: BTreeMap<String, Vec<String>>,
    ) -> Result<(), AppraisalError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = self.load();
        let prepared = prepare(
            &loaded.engine,
            &reference,
            &loaded.rules,
            loaded.has_reasons,
        )?;
        *self.reference.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(reference);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(Loaded {
            version: loaded.version,
            source: loaded.source.clone(),
            engine: loaded.engine.clone(),
            rules: loaded.rules.clone(),
            has_reasons: loaded.has_reasons,
            prepared,
        });
        Ok(())
    }

    /// The reference values in force.
    pub fn reference(&self) -> Arc<BTreeMap<String, Vec<String>>> {
        self.reference
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The policy version (in memory) and Rego source in force.
    pub fn source(&self) -> (u64, String) {
        let loaded = self.load();
        (loaded.version, loaded.source.clone())
    }

    /// Appraises one attestation's annotated evidence (the object placed in the token as
    /// `ear.veraison.annotated-evidence`).
    pub fn appraise(
        &self,
        annotated_evidence: &Map<String, Value>,
    ) -> Result<Appraisal, AppraisalError> {
        let loaded = self.load();
        let input = regorus::Value::from_json_str(
            &serde_json::to_string(annotated_evidence)
                .map_err(|e| AppraisalError::Evaluation(format!("input: {e}")))?,
        )
        .map_err(|e| AppraisalError::Evaluation(format!("input: {e}")))?;
        let mut engine = loaded.prepared.clone();
        engine.set_input(input);
        let mut trust_vector = BTreeMap::new();
        for (rule, ear_name) in &loaded.rules {
            let value = engine
                .eval_rule(format!("data.policy.{rule}"))
                .map_err(|e| AppraisalError::Evaluation(format!("{rule}: {e}")))?;
            if value == regorus::Value::Undefined {
                continue;
            }
            let claim = value
                .as_i64()
                .ok()
                .and_then(|n| i8::try_from(n).ok())
                .ok_or_else(|| {
                    AppraisalError::Evaluation(format!(
                        "{rule} is {value}, not an integer in -128..=127"
                    ))
                })?;
            trust_vector.insert(*ear_name, claim);
        }
        if trust_vector.is_empty() {
            return Err(AppraisalError::Evaluation(
                "the policy set no trust claim for this evidence".into(),
            ));
        }
        let status = trust_vector
            .values()
            .map(|v| TrustTier::of(*v))
            .max()
            .unwrap_or(TrustTier::None);
        // Reasons are read only for a verdict someone is told about (a refusal, a warning
        // in the log); an affirming one skips the `reasons` rules, about half the work of
        // an appraisal.
        let reasons = if loaded.has_reasons && status != TrustTier::Affirming {
            reasons(&mut engine)?
        } else {
            Vec::new()
        };
        Ok(Appraisal {
            status,
            trust_vector,
            policy_id: APPRAISAL_POLICY_ID,
            reasons,
        })
    }

    fn load(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn reasons(engine: &mut regorus::Engine) -> Result<Vec<String>, AppraisalError> {
    let value = engine
        .eval_rule("data.policy.reasons".to_owned())
        .map_err(|e| AppraisalError::Evaluation(format!("reasons: {e}")))?;
    let json: Value = match value {
        regorus::Value::Undefined => return Ok(Vec::new()),
        other => serde_json::to_value(&other)
            .map_err(|e| AppraisalError::Evaluation(format!("reasons: {e}")))?,
    };
    let mut out: Vec<String> = json
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out.truncate(MAX_REASONS);
    Ok(out)
}

type Compiled = (regorus::Engine, Vec<(&'static str, &'static str)>, bool);

/// Parses `rego` (Rego v1, or v0 for older upstream policies) and finds its rules.
fn compile(rego: &str) -> Result<Compiled, AppraisalError> {
    match compile_as(rego, false) {
        Ok(c) => Ok(c),
        Err(v1_error) => compile_as(rego, true).map_err(|_| v1_error),
    }
}

fn compile_as(rego: &str, v0: bool) -> Result<Compiled, AppraisalError> {
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(v0);
    engine.set_strict_builtin_errors(false);
    if let Some(check_interval) = NonZeroU32::new(1024) {
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: EVAL_TIME_LIMIT,
            check_interval,
        });
    }
    let package = engine
        .add_policy(MODULE_PATH.to_owned(), rego.to_owned())
        .map_err(|e| AppraisalError::Compile(e.to_string()))?;
    if package != "data.policy" {
        return Err(AppraisalError::Compile(format!(
            "the package must be `policy` (found `{}`)",
            package.trim_start_matches("data.")
        )));
    }
    let declared = |name: &str| {
        engine
            .has_declared_rule_rooted_at(MODULE_PATH, name)
            .map_err(|e| AppraisalError::Compile(e.to_string()))
    };
    let mut rules = Vec::new();
    for (rule, ear_name) in TRUST_CLAIMS {
        if declared(rule)? {
            rules.push((rule, ear_name));
        }
    }
    if rules.is_empty() {
        return Err(AppraisalError::Compile(
            "no trust claim rule: define at least one of instance_identity, configuration, \
             executables, file_system, hardware, runtime_opaque, storage_opaque, sourced_data"
                .into(),
        ));
    }
    let has_reasons = declared("reasons")?;
    Ok((engine, rules, has_reasons))
}

/// The compiled engine with `data.reference` merged, evaluated once: regorus analyses a
/// policy at its first evaluation and a clone keeps that analysis, so every appraisal (a clone
/// of this engine) skips it, as the resource policy's prepared engines do (`policy.rs`).
/// Without it each attestation paid the analysis again (about 1 ms of server CPU per
/// handshake in `handshake_load`).
fn prepare(
    engine: &regorus::Engine,
    reference: &BTreeMap<String, Vec<String>>,
    rules: &[(&'static str, &'static str)],
    has_reasons: bool,
) -> Result<regorus::Engine, AppraisalError> {
    let mut prepared = engine.clone();
    let data = regorus::Value::from_json_str(&json!({ "reference": reference }).to_string())
        .map_err(|e| AppraisalError::Evaluation(format!("reference values: {e}")))?;
    prepared
        .add_data(data)
        .map_err(|e| AppraisalError::Evaluation(format!("reference values: {e}")))?;
    // The outcome on an empty input does not matter (a rule may well fail on it); the
    // analysis it leaves behind does. Evaluation state is reset at each evaluation's start.
    prepared.set_input(regorus::Value::new_object());
    let names = rules.iter().map(|(rule, _)| *rule);
    for rule in names.chain(has_reasons.then_some("reasons")) {
        let _ = prepared.eval_rule(format!("data.policy.{rule}"));
    }
    Ok(prepared)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
