//! Attestation for the supervisor: the RCAR client of each KBS the daemon may use (the
//! repeated `--kbs-url`), which of them is in use, the token it last obtained there, and the
//! guest identity that the splitapi status reports (the token's `guest_id`).
//!
//! A token belongs to the KBS that issued it: moving to the next KBS drops it, so the daemon
//! attests there first (replicas that share keys would accept it, separate KBSes would not).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::token::{MIN_REFRESH_RETRY, Token};
use super::unix_now;
use crate::rcar::{KbsClient, RcarError};
use crate::splitapi::GuestIdentity;

pub(super) struct Attester {
    /// One client per KBS URL, in the order given; never empty.
    clients: Vec<KbsClient>,
    /// Index of the KBS in use.
    current: usize,
    identity: watch::Sender<GuestIdentity>,
    token: Option<Token>,
}

impl Attester {
    /// No token yet: the first [`attest`](Self::attest) gets one, from the first KBS.
    /// `clients` must not be empty.
    pub fn new(clients: Vec<KbsClient>, identity: watch::Sender<GuestIdentity>) -> Self {
        debug_assert!(!clients.is_empty());
        Self {
            clients,
            current: 0,
            identity,
            token: None,
        }
    }

    /// Index of the KBS in use (into the URLs as given).
    pub fn current(&self) -> usize {
        self.current
    }

    /// Base URL of the KBS in use.
    pub fn kbs_url(&self) -> &str {
        self.clients[self.current].kbs_url()
    }

    /// Move to the next KBS (after the last, the first again) and drop the token, which
    /// the next KBS may not accept. False (and nothing changes) when there is only one.
    pub fn fail_over(&mut self) -> bool {
        if self.clients.len() < 2 {
            return false;
        }
        self.current = (self.current + 1) % self.clients.len();
        self.token = None;
        true
    }

    /// One RCAR handshake with the KBS in use; the token's guest_id becomes the identity
    /// splitapi reports. The token is returned, not held: the caller decides whether it
    /// replaces the held one.
    pub async fn attest(&mut self) -> Result<Token, RcarError> {
        let jwt = self.clients[self.current].attest().await?;
        let token = Token::new(jwt, Instant::now(), unix_now());
        self.identity.send_if_modified(|identity| {
            let changed = identity.guest_id != token.guest_id;
            identity.guest_id.clone_from(&token.guest_id);
            changed
        });
        Ok(token)
    }

    /// The held token, if any.
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    /// Hold `token` from now on.
    pub fn hold(&mut self, token: Token) {
        self.token = Some(token);
    }

    /// Drop the held token, so the next connection attempt attests first.
    pub fn forget(&mut self) {
        self.token = None;
    }

    /// True when there is no token, or it is time to refresh it.
    pub fn must_attest(&self, now: Instant) -> bool {
        self.token.as_ref().is_none_or(|t| t.is_due(now))
    }

    /// Delay before retrying a failed in-band refresh of the held token.
    pub fn retry_delay(&self) -> Duration {
        self.token
            .as_ref()
            .map_or(MIN_REFRESH_RETRY, |t| t.retry_delay(Instant::now()))
    }
}
