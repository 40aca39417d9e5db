//! Changes to what replicas keep in memory, as the store announces them.
//!
//! A KBS holds some stored state in memory: the resource policy, the appraisal policy and
//! reference values, which plugins are enabled, the rollouts in force. A replica changes its
//! own copy when its admin API writes; when several replicas share one database (PostgreSQL),
//! the others learn of the write from this feed and reload what it names. PostgreSQL carries
//! it with `NOTIFY` on [`CHANNEL`]; the SQLite store is one process's own and announces
//! nothing. See `docs/architecture.md`, "Several replicas".
//!
//! A subscriber that falls behind (`RecvError::Lagged`) or sees [`Change::Lost`] reloads
//! everything it follows: notifications may have been missed.

use tokio::sync::broadcast;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "tether_changes";
/// Changes buffered per subscriber before it lags (and reloads everything).
pub const FEED_CAPACITY: usize = 1024;
/// Longest payload announced (PostgreSQL allows 8000 bytes); a longer name is announced as
/// [`Change::Lost`], which every subscriber handles by reloading all it follows.
const MAX_PAYLOAD: usize = 4096;

/// What changed in the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A resource got a new version or was deleted (its path).
    Resource(String),
    /// A named policy got a new version (`resource`, `appraisal`).
    Policy(String),
    /// A reference value was set or deleted.
    ReferenceValues,
    /// A plugin was enabled or disabled (its name).
    PluginState(String),
    /// A rollout was created or changed state (its id).
    Rollout(i64),
    /// Notifications may have been missed: reload everything.
    Lost,
}

impl Change {
    /// The notification payload.
    pub fn encode(&self) -> String {
        let s = match self {
            Change::Resource(p) => format!("r:{p}"),
            Change::Policy(n) => format!("p:{n}"),
            Change::ReferenceValues => "v".to_owned(),
            Change::PluginState(n) => format!("s:{n}"),
            Change::Rollout(id) => format!("o:{id}"),
            Change::Lost => "*".to_owned(),
        };
        if s.len() > MAX_PAYLOAD {
            "*".to_owned()
        } else {
            s
        }
    }

    /// A payload read back; `None` for one this version does not know (logged by the caller).
    pub fn decode(payload: &str) -> Option<Self> {
        let (kind, rest) = payload.split_once(':').unwrap_or((payload, ""));
        Some(match (kind, rest) {
            ("r", p) if !p.is_empty() => Change::Resource(p.to_owned()),
            ("p", n) if !n.is_empty() => Change::Policy(n.to_owned()),
            ("v", "") => Change::ReferenceValues,
            ("s", n) if !n.is_empty() => Change::PluginState(n.to_owned()),
            ("o", id) => Change::Rollout(id.parse().ok()?),
            ("*", "") => Change::Lost,
            _ => return None,
        })
    }
}

/// Fan-out of changes to the parts of this process that follow them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChangeFeed {
    tx: broadcast::Sender<Change>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(FEED_CAPACITY).0,
        }
    }
}

impl ChangeFeed {
    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Announce `change` to this process's subscribers (none listening is fine).
    pub fn publish(&self, change: Change) {
        let _ = self.tx.send(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_survives_its_payload() {
        for c in [
            Change::Resource("default/key/one".into()),
            Change::Policy("resource".into()),
            Change::ReferenceValues,
            Change::PluginState("external/secrets".into()),
            Change::Rollout(42),
            Change::Lost,
        ] {
            assert_eq!(Change::decode(&c.encode()), Some(c));
        }
    }

    #[test]
    fn unknown_or_malformed_payloads_decode_to_nothing() {
        for p in ["", "x:1", "o:abc", "r:", "p:", "s:", "v:extra", "*:x", "o:"] {
            assert_eq!(Change::decode(p), None, "{p:?}");
        }
    }

    #[test]
    fn an_oversized_name_is_announced_as_lost() {
        let long = "a".repeat(MAX_PAYLOAD + 1);
        assert_eq!(Change::Resource(long).encode(), "*");
        assert_eq!(Change::Resource("a".repeat(100)).encode().len(), 102);
    }

    #[tokio::test]
    async fn subscribers_get_what_is_published_after_they_subscribe() {
        let feed = ChangeFeed::default();
        feed.publish(Change::ReferenceValues);
        let mut rx = feed.subscribe();
        feed.publish(Change::Rollout(7));
        assert_eq!(rx.recv().await.unwrap(), Change::Rollout(7));
    }
}
