//! [`ResourceNotices`]: what one part of the KBS tells the others about resources, without
//! knowing who listens. The resource plugin announces a delete; the rotation plugin, a
//! separate crate, subscribes and stops the rollouts of that path. A broadcast: a slow
//! subscriber that lags learns it (`RecvError::Lagged`) and must re-check on its own.

use tokio::sync::broadcast;

/// Notices buffered for a slow subscriber before it lags.
const CAPACITY: usize = 1024;

/// Who did it, as the audit log names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeActor {
    /// `subject@key`.
    pub name: String,
    /// The admin role.
    pub role: String,
}

/// Something that happened to a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceNotice {
    /// Every version of `path` was erased.
    Deleted {
        /// `repo/type/tag`.
        path: String,
        /// Who deleted it.
        by: NoticeActor,
    },
}

/// The resource notice channel. Cheap to clone; all clones share it.
#[derive(Clone, Debug)]
pub struct ResourceNotices {
    tx: broadcast::Sender<ResourceNotice>,
}

impl Default for ResourceNotices {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceNotices {
    /// A channel nobody listens to yet.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    /// Tell every subscriber; never waits. Returns how many subscribers there are.
    pub fn publish(&self, notice: ResourceNotice) -> usize {
        self.tx.send(notice).unwrap_or(0)
    }

    /// Notices published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ResourceNotice> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_what_is_published_after_they_subscribe() {
        let notices = ResourceNotices::new();
        let deleted = |p: &str| ResourceNotice::Deleted {
            path: p.into(),
            by: NoticeActor {
                name: "a@k".into(),
                role: "admin".into(),
            },
        };
        assert_eq!(notices.publish(deleted("r/t/0")), 0, "nobody listens");
        let mut rx = notices.subscribe();
        assert_eq!(notices.clone().publish(deleted("r/t/1")), 1);
        assert_eq!(rx.recv().await.unwrap(), deleted("r/t/1"));
    }
}
