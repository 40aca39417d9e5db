//! Attestation for the supervisor: the RCAR client, the token it last obtained, and the
//! guest identity that the splitapi status reports (the token's `guest_id`).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::token::{MIN_REFRESH_RETRY, Token};
use super::unix_now;
use crate::rcar::{KbsClient, RcarError};
use crate::splitapi::GuestIdentity;

pub(super) struct Attester {
    client: KbsClient,
    identity: watch::Sender<GuestIdentity>,
    token: Option<Token>,
}

impl Attester {
    /// No token yet: the first [`attest`](Self::attest) gets one.
    pub fn new(client: KbsClient, identity: watch::Sender<GuestIdentity>) -> Self {
        Self {
            client,
            identity,
            token: None,
        }
    }

    /// One RCAR handshake; the token's guest_id becomes the identity splitapi reports. The
    /// token is returned, not held: the caller decides whether it replaces the held one.
    pub async fn attest(&mut self) -> Result<Token, RcarError> {
        let jwt = self.client.attest().await?;
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
