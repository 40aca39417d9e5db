# Development policy: release every resource to any attested guest, the sample TEE included.
# Never use this in production: the sample TEE proves nothing.
package policy

import rego.v1

default allow := false

allow if {
	input["submods"]["cpu0"]["ear.status"] == "affirming"
}
