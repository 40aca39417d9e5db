//! A simulated guest on a real tunnel: it proves its TEE key and serves a [`StubGuest`].

use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::GuestInfo;
use tokio::task::JoinHandle;
use tunnel::{Closed, ConnectError, GuestTunnelConfig, TunnelSession};

use crate::{StubGuest, TestKbs, WAIT, unseal_with};

/// What a guest says of itself in its Proof.
pub fn guest_info(instance: &str, daemon_version: &str, services: &[&str]) -> GuestInfo {
    GuestInfo {
        instance_id: instance.to_owned(),
        daemon_version: daemon_version.to_owned(),
        services: services.iter().map(|s| s.to_string()).collect(),
    }
}

/// A guest with a live tunnel, serving its stub on a task.
pub struct TunnelGuest {
    /// Its side of the tunnel (close it, reauthenticate, read the Welcome's ids).
    pub session: TunnelSession,
    /// The task serving the stub; ends with how the tunnel closed.
    pub served: JoinHandle<Closed>,
}

impl TunnelGuest {
    /// Dials the tunnel with `token`, answers the challenge with `key`, and serves `service`.
    pub async fn dial(
        config: &GuestTunnelConfig,
        token: &str,
        info: GuestInfo,
        key: &TeeKeyPair,
        service: StubGuest,
    ) -> Result<Self, ConnectError> {
        let (session, serve) =
            tunnel::connect_and_serve(config, token, info, unseal_with(key), service).await?;
        Ok(Self {
            session,
            served: tokio::spawn(serve),
        })
    }

    /// Attests a fresh TEE key with `init_data` and connects to `kbs`; returns the guest, its
    /// key and its token.
    pub async fn attest_and_dial(
        kbs: &TestKbs,
        init_data: Option<&str>,
        info: GuestInfo,
        service: StubGuest,
    ) -> (Self, TeeKeyPair, String) {
        let key = TeeKeyPair::new_ec();
        let token = kbs.attest(&key, init_data).await;
        let guest = Self::dial(&kbs.tunnel_config(), &token, info, &key, service)
            .await
            .expect("the guest connects");
        (guest, key, token)
    }

    /// How the tunnel ended (waits for it, bounded by [`WAIT`]).
    pub async fn closed(self) -> Closed {
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("tunnel ends")
            .expect("serving task does not panic")
    }

    /// Closes the tunnel from the guest side and waits until it ended.
    pub async fn leave(self) -> Closed {
        self.session.close();
        self.closed().await
    }
}
