//! The RCAR client (Request, Challenge, Attestation, Response): attests to the
//! KBS and fetches resources, wire compatible with upstream guest-components'
//! `kbs_protocol` client.
//!
//! Background-check mode keeps the KBS session in a cookie store; passport
//! mode presents the attestation token as a bearer credential instead.
//!
//! Inside: `protocol` builds and checks the RCAR messages without I/O; `client` runs them
//! over HTTP (`http`: the reqwest settings and bounded body reads) with the session cookie
//! or a bearer token; `builder` validates the settings; `token` is the attestation token the
//! client holds; `error` says what went wrong, naming the request and the KBS's detail.

mod builder;
mod client;
mod error;
mod http;
mod protocol;
mod token;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod mock_kbs_tests;

use kbs_types::HashAlgorithm;

pub use builder::KbsClientBuilder;
pub use client::KbsClient;
pub use error::{ErrorBody, RcarError};
pub use protocol::{build_request, runtime_data_digest, select_hash_algorithm};
pub use token::jwt_expiry;

/// KBS protocol version sent in the RCAR `Request`.
pub const KBS_PROTOCOL_VERSION: &str = "0.4.0";
/// Most GETs of one resource, re-attesting between them on 401 (upstream's
/// `KBS_GET_RESOURCE_MAX_ATTEMPT`).
pub const GET_RESOURCE_MAX_ATTEMPTS: u32 = 3;
/// Hash used for the runtime-data digest when the KBS does not pick one.
pub const DEFAULT_HASH_ALGORITHM: HashAlgorithm = HashAlgorithm::Sha384;

const KBS_PREFIX: &str = "kbs/v0";
