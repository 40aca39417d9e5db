package policy

import rego.v1

# Tether's default appraisal policy (the attestation policy of upstream's attestation
# service, same conventions): from the verified evidence claims and the operator's reference
# values to an EAR trust vector; the token's `ear.status` is the worst tier in it.
#
# input: the annotated evidence of one attestation, as upstream's attestation service hands
#   it to its policies: input.tdx / input.snp / input.sample (the verifier's claims), and
#   input.init_data, input.init_data_claims, input.runtime_data_claims, input.report_data.
# data.reference: the reference values, name -> list of strings
#   (`kbsctl reference-values set NAME VALUE...`).
#
# Each rule named after an EAR trust claim (instance_identity, configuration, executables,
# file_system, hardware, runtime_opaque, storage_opaque, sourced_data) sets that claim when
# defined. AR4SI values: 0/1 none, 2..31 affirming, 32..95 warning, 96..127 contraindicated.
# A contraindicated appraisal gets no token. `reasons` explains the verdict (logs, refusals).
#
# Switches (reference values holding "true"):
#   allow_outdated_tcb  an out-of-date TCB (TDX OutOfDate*, SNP below snp_min_*) is a
#                       warning instead of a refusal;
#   allow_debug         a debug TD / SNP guest whose policy allows debugging is a warning
#                       instead of a refusal.

reference := object.get(data, "reference", {})

switch(name) if "true" in object.get(reference, name, [])

configured(name) if count(object.get(reference, name, [])) > 0

# A reference value is set for `name` and `value` is none of its values.
mismatch(name, value) if {
	configured(name)
	not value in reference[name]
}

is_true(v) if v == true

is_true(v) if v == "true"

# "For the `hardware` trust claim, the value 97 stands for: a Verifier does not recognize
# an Attester's hardware or firmware, but it should be recognized."
default hardware := 97

# 33: runtime memory includes executables which are not recognized (no reference value
# recognizes this boot chain yet).
default executables := 33

# 36: elements of the configuration relevant to security are unavailable.
default configuration := 36

##### sample: development only, nothing in its evidence is signed. Rated affirming so a
##### development set-up behaves as before; the default resource policy refuses it.

hardware := 2 if input.sample

executables := 3 if input.sample

configuration := 2 if input.sample

##### TDX

tdx_body := object.get(object.get(input.tdx, "quote", {}), "body", {})

tdx_genuine if {
	input.tdx.quote.header.tee_type == "81000000"
	input.tdx.quote.header.vendor_id == "939a7233f79c4ca9940a0db3957f0607"
}

tdx_outdated if input.tdx.tcb_status in {"OutOfDate", "OutOfDateConfigurationNeeded"}

# Up to date, but the platform needs configuration, or the TD a relaunch: known issues.
tdx_warned if input.tdx.tcb_status in {
	"ConfigurationNeeded",
	"ConfigurationAndSWHardeningNeeded",
	"TDRelaunchAdvised",
	"TDRelaunchAdvisedConfigurationNeeded",
}

tdx_current if input.tdx.tcb_status in {"UpToDate", "SWHardeningNeeded"}

# The TDX module (MRSEAM) and the TEE TCB SVN, when the operator pinned them.
tdx_hardware_mismatches contains name if {
	some name in ["mr_seam", "tcb_svn"]
	mismatch(name, object.get(tdx_body, name, ""))
}

# The firmware (MRTD) and the boot chain measured into the RTMRs.
tdx_boot_names := ["mr_td", "rtmr_0", "rtmr_1", "rtmr_2", "rtmr_3"]

tdx_boot_mismatches contains name if {
	some name in tdx_boot_names
	mismatch(name, object.get(tdx_body, name, ""))
}

tdx_boot_configured if {
	some name in tdx_boot_names
	configured(name)
}

hardware := tdx_hardware if input.tdx

tdx_hardware := 97 if {
	not tdx_genuine
} else := 96 if {
	count(tdx_hardware_mismatches) > 0
} else := 96 if {
	tdx_outdated
	not switch("allow_outdated_tcb")
} else := 32 if {
	tdx_outdated
} else := 32 if {
	tdx_warned
} else := 2 if {
	tdx_current
}

executables := 96 if {
	input.tdx
	count(tdx_boot_mismatches) > 0
}

executables := 3 if {
	input.tdx
	tdx_boot_configured
	count(tdx_boot_mismatches) == 0
}

configuration := tdx_configuration if input.tdx

tdx_configuration := 96 if {
	mismatch("init_data", object.get(input, "init_data", ""))
} else := 96 if {
	is_true(input.tdx.td_attributes.debug)
	not switch("allow_debug")
} else := 32 if {
	is_true(input.tdx.td_attributes.debug)
} else := 2 if {
	input.tdx.td_attributes.debug == false
}

##### SNP (AMD publishes no TCB status: minimums are reference values)

snp_minimums := {
	"bootloader": "snp_min_bootloader",
	"tee": "snp_min_tee",
	"snp": "snp_min_snp",
	"microcode": "snp_min_microcode",
	"fmc": "snp_min_fmc",
}

snp_below contains part if {
	some part, name in snp_minimums
	some minimum in reference[name]
	to_number(input.snp[concat("", ["reported_tcb_", part])]) < to_number(minimum)
}

hardware := snp_hardware if input.snp

snp_hardware := 96 if {
	count(snp_below) > 0
	not switch("allow_outdated_tcb")
} else := 32 if {
	count(snp_below) > 0
} else := 2 if {
	input.snp.reported_tcb_bootloader
	input.snp.reported_tcb_tee
	input.snp.reported_tcb_snp
	input.snp.reported_tcb_microcode
}

executables := 96 if {
	input.snp
	mismatch("measurement", object.get(input.snp, "measurement", ""))
}

executables := 3 if {
	input.snp
	configured("measurement")
	not mismatch("measurement", object.get(input.snp, "measurement", ""))
}

configuration := snp_configuration if input.snp

snp_configuration := 96 if {
	mismatch("init_data", object.get(input, "init_data", ""))
} else := 96 if {
	is_true(input.snp.policy_debug_allowed)
	not switch("allow_debug")
} else := 32 if {
	is_true(input.snp.policy_debug_allowed)
} else := 32 if {
	is_true(input.snp.policy_migrate_ma)
} else := 2 if {
	input.snp.policy_debug_allowed
}

##### Why: one sentence per finding, for logs and refusals.

reasons contains sprintf("TDX TCB status %s is out of date (reference value allow_outdated_tcb = true accepts it as a warning)", [input.tdx.tcb_status]) if tdx_outdated

reasons contains sprintf("TDX TCB status %s: the platform needs configuration or the TD a relaunch", [input.tdx.tcb_status]) if tdx_warned

reasons contains "the quote is not a TDX quote signed by Intel's quoting enclave" if {
	input.tdx
	not tdx_genuine
}

reasons contains sprintf("%s is not among its reference values", [name]) if {
	some name in tdx_hardware_mismatches
}

reasons contains sprintf("%s is not among its reference values", [name]) if {
	some name in tdx_boot_mismatches
}

reasons contains "no reference value for mr_td or rtmr_0..3: the boot chain is not recognized" if {
	input.tdx
	not tdx_boot_configured
}

reasons contains "the TD is a debug TD (reference value allow_debug = true accepts it as a warning)" if {
	is_true(input.tdx.td_attributes.debug)
}

reasons contains sprintf("SNP reported TCB %s is below its minimum (reference value allow_outdated_tcb = true accepts it as a warning)", [part]) if {
	some part in snp_below
}

reasons contains "measurement is not among its reference values" if {
	input.snp
	mismatch("measurement", object.get(input.snp, "measurement", ""))
}

reasons contains "no reference value for measurement: the launch measurement is not recognized" if {
	input.snp
	not configured("measurement")
}

reasons contains "the guest policy allows debugging (reference value allow_debug = true accepts it as a warning)" if {
	is_true(input.snp.policy_debug_allowed)
}

reasons contains "the guest policy allows a migration agent" if {
	is_true(input.snp.policy_migrate_ma)
}

reasons contains "init_data is not among its reference values" if {
	mismatch("init_data", object.get(input, "init_data", ""))
}
