//! [`Labels`]: a guest's attested labels, shared. The token cache, the guest directory, the
//! tunnel handle and the fleet view all hold the same label set of a guest, and guests of one
//! deployment usually carry the same set, so one copy per distinct set is kept ([`intern`]):
//! a `BTreeMap` with a single entry already costs a ~0.5 KiB node, which used to be paid three
//! times per idle tunnel.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, LazyLock, Mutex},
};

/// Attested labels (init-data `[tether.labels]`), shared and immutable.
pub type Labels = Arc<BTreeMap<String, String>>;

/// Distinct label sets in use. Entries nobody else holds are dropped whenever the set has
/// doubled since the last sweep, so it stays proportional to the sets in use.
struct LabelSets {
    sets: HashSet<Labels>,
    sweep_at: usize,
}

const FIRST_SWEEP: usize = 1024;

static SETS: LazyLock<Mutex<LabelSets>> = LazyLock::new(|| {
    Mutex::new(LabelSets {
        sets: HashSet::new(),
        sweep_at: FIRST_SWEEP,
    })
});

/// The shared copy of `labels` (equal sets give the same `Arc`).
pub fn intern(labels: Labels) -> Labels {
    if labels.is_empty() {
        return empty();
    }
    let mut guard = SETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = guard.sets.get(&labels) {
        return shared.clone();
    }
    if guard.sets.len() >= guard.sweep_at {
        guard.sets.retain(|s| Arc::strong_count(s) > 1);
        guard.sweep_at = (guard.sets.len() * 2).max(FIRST_SWEEP);
    }
    guard.sets.insert(labels.clone());
    labels
}

/// The shared copy of a label map.
pub fn intern_map(labels: &BTreeMap<String, String>) -> Labels {
    if labels.is_empty() {
        return empty();
    }
    {
        let guard = SETS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = guard.sets.get(labels) {
            return shared.clone();
        }
    }
    intern(Arc::new(labels.clone()))
}

/// The empty label set (no allocation beyond one shared `Arc`).
pub fn empty() -> Labels {
    static EMPTY: LazyLock<Labels> = LazyLock::new(|| Arc::new(BTreeMap::new()));
    EMPTY.clone()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn equal_sets_share_one_copy_and_different_ones_do_not() {
        let a = intern_map(&set(&[("app", "interned-test"), ("tier", "1")]));
        let b = intern(Arc::new(set(&[("app", "interned-test"), ("tier", "1")])));
        let c = intern_map(&set(&[("app", "interned-test"), ("tier", "2")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c["tier"], "2");
        assert!(Arc::ptr_eq(&intern_map(&BTreeMap::new()), &empty()));
    }

    #[test]
    fn unused_sets_are_swept() {
        for i in 0..(FIRST_SWEEP * 3) {
            drop(intern_map(&set(&[("sweep", &i.to_string())])));
        }
        let len = SETS.lock().unwrap().sets.len();
        assert!(len <= FIRST_SWEEP * 2, "{len} sets kept");
    }
}
