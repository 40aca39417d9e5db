//! The label selector of rollouts, probes and the fleet view (`app=web,tier!=db,env in (a,b)`):
//! parse, then match against a fixed label set.
#![no_main]

use std::collections::BTreeMap;

use kbs_core::selector::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = Selector::parse(text) {
        let labels = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "front".to_string()),
        ]);
        let _ = selector.matches(&labels);
        let _ = selector.matches(&BTreeMap::new());
    }
});
