//! An HTTP client for the admin API, used by `kbsctl` and by the tests.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use kbs_core::admin_key::{AdminKeyPair, AdminTokenRequest};
use kbs_core::probe::ProbeRequest;
use rpc_defs::ProbeKind;

use crate::http::guests::{GuestList, GuestSummary, PingReply};

const RESOURCE_POLICY: &str = "/kbs/v0/resource-policy";
const APPRAISAL_POLICY: &str = "/kbs/v0/admin/appraisal-policy";

/// Errors talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The KBS answered with an error body.
    #[error("{status}: {name}: {detail}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Error name from the `type` URL.
        name: String,
        /// Detail.
        detail: String,
    },
    /// Transport failure, with reqwest's causes (connection refused, TLS...) in the message and
    /// not as `source()`, so `{}` says why and `{:#}` does not say it twice.
    #[error("request failed: {}", error_chain(.0))]
    Http(reqwest::Error),
    /// Key or file trouble.
    #[error("{0}")]
    Local(String),
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        Self::Http(e)
    }
}

/// `e` and every error below it, joined by `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(&format!(": {s}"));
        next = s.source();
    }
    out
}

/// Admin API client: signs a short-lived admin token per request.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    key: AdminKeyPair,
    subject: String,
    role: String,
}

impl AdminClient {
    /// Build for `base_url` with an admin private key, optional CA file for TLS.
    pub fn new(
        base_url: &str,
        key: AdminKeyPair,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .use_rustls_tls();
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Local(format!("CA file {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ClientError::Local(format!("CA file {}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build()?,
            base: base_url.trim_end_matches('/').to_string(),
            key,
            subject: "kbsctl".into(),
            role: "admin".into(),
        })
    }

    /// Set the token subject and role.
    pub fn with_identity(mut self, subject: &str, role: &str) -> Self {
        self.subject = subject.to_string();
        self.role = role.to_string();
        self
    }

    /// Base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A fresh admin token (60 s).
    pub fn token(&self) -> Result<String, ClientError> {
        self.key
            .sign(&AdminTokenRequest::new(
                &self.subject,
                &self.role,
                Duration::from_secs(60),
            ))
            .map_err(|e| ClientError::Local(e.to_string()))
    }

    /// Send a request and return the JSON answer (or the API error).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<RequestBody>,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token()?);
        req = match body {
            Some(RequestBody::Json(v)) => req.json(&v),
            Some(RequestBody::Bytes(b)) => req
                .header("content-type", "application/octet-stream")
                .body(b),
            None => req,
        };
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Local(format!("KBS answered {status} with non-JSON body: {e}"))
            });
        }
        let (name, detail) = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => (
                v["type"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string(),
                v["detail"].as_str().unwrap_or("").to_string(),
            ),
            Err(_) => (String::new(), String::from_utf8_lossy(&bytes).into_owned()),
        };
        Err(ClientError::Api {
            status,
            name,
            detail,
        })
    }

    /// Upload a new version of a resource.
    pub async fn put_resource(&self, path: &str, data: Vec<u8>) -> Result<Value, ClientError> {
        self.send(
            Method::POST,
            &format!("/kbs/v0/resource/{path}"),
            Some(RequestBody::Bytes(data)),
        )
        .await
    }

    /// Versions of a resource.
    pub async fn resource_versions(&self, path: &str) -> Result<Value, ClientError> {
        self.send(
            Method::GET,
            &format!("/kbs/v0/admin/resources/{path}/versions"),
            None,
        )
        .await
    }

    /// Delete a resource.
    pub async fn delete_resource(&self, path: &str) -> Result<Value, ClientError> {
        self.send(Method::DELETE, &format!("/kbs/v0/resource/{path}"), None)
            .await
    }

    /// Install a resource policy (Rego text).
    pub async fn set_policy(&self, rego: &str) -> Result<Value, ClientError> {
        self.post_rego(RESOURCE_POLICY, rego).await
    }

    /// The current resource policy text and version.
    pub async fn get_policy(&self) -> Result<(String, u64), ClientError> {
        self.get_rego(RESOURCE_POLICY).await
    }

    /// POSTs Rego text as upstream's policy body (`{"policy": <base64url>}`) to `endpoint`.
    async fn post_rego(&self, endpoint: &str, rego: &str) -> Result<Value, ClientError> {
        let body = serde_json::json!({"policy": URL_SAFE_NO_PAD.encode(rego.as_bytes())});
        self.send(Method::POST, endpoint, Some(RequestBody::Json(body)))
            .await
    }

    /// GETs a policy endpoint's text and version.
    async fn get_rego(&self, endpoint: &str) -> Result<(String, u64), ClientError> {
        let v = self.send(Method::GET, endpoint, None).await?;
        let text = URL_SAFE_NO_PAD
            .decode(v["policy"].as_str().unwrap_or(""))
            .map_err(|e| ClientError::Local(format!("policy is not base64url: {e}")))?;
        Ok((
            String::from_utf8_lossy(&text).into_owned(),
            v["version"].as_u64().unwrap_or(0),
        ))
    }

    /// Reference values and the names the default appraisal policy knows.
    pub async fn reference_values(&self) -> Result<Value, ClientError> {
        self.send(Method::GET, "/kbs/v0/admin/reference-values", None)
            .await
    }

    /// Sets (replaces) the accepted values of a reference value.
    pub async fn set_reference_value(
        &self,
        name: &str,
        values: &[String],
    ) -> Result<Value, ClientError> {
        self.send(
            Method::PUT,
            &format!("/kbs/v0/admin/reference-values/{name}"),
            Some(RequestBody::Json(serde_json::json!({ "values": values }))),
        )
        .await
    }

    /// Removes a reference value.
    pub async fn delete_reference_value(&self, name: &str) -> Result<Value, ClientError> {
        self.send(
            Method::DELETE,
            &format!("/kbs/v0/admin/reference-values/{name}"),
            None,
        )
        .await
    }

    /// Installs an appraisal policy (Rego text).
    pub async fn set_appraisal_policy(&self, rego: &str) -> Result<Value, ClientError> {
        self.post_rego(APPRAISAL_POLICY, rego).await
    }

    /// The appraisal policy in force and its stored version (0: built-in or initial file).
    pub async fn get_appraisal_policy(&self) -> Result<(String, u64), ClientError> {
        self.get_rego(APPRAISAL_POLICY).await
    }

    /// Guests with a live tunnel to this KBS, sorted by id.
    pub async fn list_guests(&self) -> Result<Vec<GuestSummary>, ClientError> {
        let v = self.send(Method::GET, "/kbs/v0/admin/guests", None).await?;
        Ok(parse::<GuestList>("guest list", v)?.guests)
    }

    /// Echo 256 bytes through a guest's tunnel; the round-trip time in microseconds.
    pub async fn ping_guest(&self, guest_id: &str) -> Result<u64, ClientError> {
        let path = format!("/kbs/v0/admin/guests/{}/ping", path_segment(guest_id));
        let v = self.send(Method::POST, &path, None).await?;
        Ok(parse::<PingReply>("ping reply", v)?.rtt_us)
    }

    /// Ask a guest for health, held resources and/or runtime figures through its tunnel.
    pub async fn probe_guest(
        &self,
        guest_id: &str,
        kind: ProbeKind,
    ) -> Result<rpc_defs::ProbeReport, ClientError> {
        let path = format!("/kbs/v0/admin/guests/{}/probe", path_segment(guest_id));
        let body = serde_json::to_value(ProbeRequest { kind })
            .map_err(|e| ClientError::Local(format!("probe request: {e}")))?;
        let v = self
            .send(Method::POST, &path, Some(RequestBody::Json(body)))
            .await?;
        parse("probe report", v)
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v)
        .map_err(|e| ClientError::Local(format!("unexpected {what} from the KBS: {e}")))
}

/// Percent-encode one path segment (guest ids are plain already; this keeps odd ones intact).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request body.
pub enum RequestBody {
    /// JSON.
    Json(Value),
    /// Raw bytes.
    Bytes(Vec<u8>),
}

/// Rotation rollouts (`/kbs/v0/rotation/...`).
impl AdminClient {
    /// Start a rollout.
    pub async fn start_rollout(
        &self,
        req: &plugin_rotation::StartRollout,
    ) -> Result<plugin_rotation::RolloutView, ClientError> {
        let body = serde_json::to_value(req)
            .map_err(|e| ClientError::Local(format!("rollout request: {e}")))?;
        let v = self
            .send(
                Method::POST,
                "/kbs/v0/rotation/rollouts",
                Some(RequestBody::Json(body)),
            )
            .await?;
        parse("rollout", v)
    }

    /// A rollout with one page of targets (`query`: e.g. `state=failed&limit=100`).
    pub async fn rollout(
        &self,
        id: i64,
        query: &str,
    ) -> Result<plugin_rotation::RolloutDetail, ClientError> {
        let mut path = format!("/kbs/v0/rotation/rollouts/{id}");
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        let v = self.send(Method::GET, &path, None).await?;
        parse("rollout", v)
    }

    /// Rollouts, newest first.
    pub async fn list_rollouts(
        &self,
        in_force: bool,
        limit: u32,
    ) -> Result<plugin_rotation::RolloutList, ClientError> {
        let v = self
            .send(
                Method::GET,
                &format!("/kbs/v0/rotation/rollouts?in_force={in_force}&limit={limit}"),
                None,
            )
            .await?;
        parse("rollout list", v)
    }

    /// Pause, resume or cancel a rollout.
    pub async fn control_rollout(
        &self,
        id: i64,
        action: plugin_rotation::Control,
    ) -> Result<plugin_rotation::RolloutView, ClientError> {
        let v = self
            .send(
                Method::POST,
                &format!("/kbs/v0/rotation/rollouts/{id}/{}", action.as_str()),
                None,
            )
            .await?;
        parse("rollout", v)
    }

    /// Open the server-sent-events stream of a rollout.
    pub async fn watch_rollout(&self, id: i64) -> Result<RolloutWatch, ClientError> {
        let resp = self
            .http
            .get(format!(
                "{}/kbs/v0/rotation/rollouts/{id}/events",
                self.base
            ))
            .bearer_auth(self.token()?)
            .timeout(Duration::from_secs(7 * 24 * 3600))
            .send()
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                name: body["type"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string(),
                detail: body["detail"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(RolloutWatch {
            resp,
            buf: Vec::new(),
        })
    }
}

/// One message of a rollout's event stream.
#[derive(Clone, Debug)]
pub enum RolloutUpdate {
    /// The whole rollout with its counts (first, and after the stream fell behind).
    Snapshot(plugin_rotation::RolloutView),
    /// One change.
    Change(plugin_rotation::RolloutEvent),
    /// The server could not tell everything (`ReadBackFailed`: it fell behind and could not
    /// read the rollout back; the stream goes on) or stops (`StreamClosed`: it shuts down).
    Error {
        /// CamelCase name, as in an API error's `type`.
        name: String,
        /// What happened.
        detail: String,
    },
}

/// A rollout's server-sent-events stream.
pub struct RolloutWatch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl RolloutWatch {
    /// The next update; `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<RolloutUpdate>, ClientError> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let (mut kind, mut data) = ("message", String::new());
                for line in text.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = match k.trim() {
                            "snapshot" => "snapshot",
                            "change" => "change",
                            "error" => "error",
                            _ => "other",
                        };
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                let bad =
                    |e: serde_json::Error| ClientError::Local(format!("bad rollout event: {e}"));
                match kind {
                    "snapshot" => {
                        return Ok(Some(RolloutUpdate::Snapshot(
                            serde_json::from_str(&data).map_err(bad)?,
                        )));
                    }
                    "change" => {
                        return Ok(Some(RolloutUpdate::Change(
                            serde_json::from_str(&data).map_err(bad)?,
                        )));
                    }
                    "error" => {
                        let body: Value = serde_json::from_str(&data).map_err(bad)?;
                        return Ok(Some(RolloutUpdate::Error {
                            name: body["type"].as_str().unwrap_or("").to_string(),
                            detail: body["detail"].as_str().unwrap_or("").to_string(),
                        }));
                    }
                    _ => continue,
                }
            }
            match self.resp.chunk().await? {
                Some(chunk) => {
                    if self.buf.len() + chunk.len() > 4 * 1024 * 1024 {
                        return Err(ClientError::Local("rollout event too large".into()));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                None => return Ok(None),
            }
        }
    }
}

/// The workload owner's splitapi client bundle (`GET /kbs/v0/splitapi/owner/<id>/credentials`).
#[derive(Clone, serde::Deserialize)]
pub struct OwnerBundle {
    /// Guest id.
    pub guest_id: String,
    /// Credential version.
    pub version: u64,
    /// Client certificate expiry, Unix seconds.
    pub not_after: u64,
    /// The sandbox CA, PEM.
    #[serde(rename = "ca.crt")]
    pub ca_crt: String,
    /// Client certificate, PEM.
    #[serde(rename = "client.crt")]
    pub client_crt: String,
    /// Client private key, PKCS#8 PEM.
    #[serde(rename = "client.key")]
    pub client_key: String,
}

impl Drop for OwnerBundle {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.client_key);
    }
}

impl std::fmt::Debug for OwnerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerBundle")
            .field("guest_id", &self.guest_id)
            .field("version", &self.version)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl OwnerBundle {
    /// Write `ca.crt`, `client.crt` (0644) and `client.key` (0600) into `dir`, each atomically.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        kbs_core::fsutil::write_private_atomic(
            &dir.join("client.key"),
            self.client_key.as_bytes(),
        )?;
        for (name, pem) in [("ca.crt", &self.ca_crt), ("client.crt", &self.client_crt)] {
            let path = dir.join(name);
            kbs_core::fsutil::write_private_atomic(&path, pem.as_bytes())?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    }
}

/// A plugin name in a URL: `external/echo` keeps its `/`, each segment is escaped.
fn plugin_path(name: &str) -> String {
    name.split('/')
        .map(path_segment)
        .collect::<Vec<_>>()
        .join("/")
}

impl AdminClient {
    /// `GET /kbs/v0/plugin`: `{"plugins": [{name, kind, kinds, enabled, version}]}`.
    pub async fn list_plugins(&self) -> Result<Value, ClientError> {
        self.send(Method::GET, "/kbs/v0/plugin", None).await
    }

    /// Enable or disable a plugin: `{"name", "enabled", "changed"}`.
    pub async fn set_plugin_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<Value, ClientError> {
        let verb = if enabled { "enable" } else { "disable" };
        self.send(
            Method::POST,
            &format!("/kbs/v0/plugin/{verb}/{}", plugin_path(name)),
            None,
        )
        .await
    }

    /// Change a plugin's run-time settings (a JSON object; an external plugin's `endpoint`,
    /// `tls_mode`, `ca_cert_path`, `timeout_ms`): `{"name", "settings"}` as now in force.
    pub async fn configure_plugin(
        &self,
        name: &str,
        settings: Value,
    ) -> Result<Value, ClientError> {
        self.send(
            Method::POST,
            &format!("/kbs/v0/plugin/configure/{}", plugin_path(name)),
            Some(RequestBody::Json(settings)),
        )
        .await
    }

    /// The owner's splitapi client bundle for `guest_id`.
    pub async fn splitapi_client_creds(&self, guest_id: &str) -> Result<OwnerBundle, ClientError> {
        let v = self
            .send(
                Method::GET,
                &format!(
                    "/kbs/v0/splitapi/owner/{}/credentials",
                    path_segment(guest_id)
                ),
                None,
            )
            .await?;
        parse("splitapi owner bundle", v)
    }

    /// `POST /kbs/v0/provisioner/provision`: provision (or find) a VM's disk key;
    /// `{uuid, resource_path, oemstring, mrconfigid, hostdata}`.
    pub async fn provision(&self, vm_name: &str, namespace: &str) -> Result<Value, ClientError> {
        self.send(
            Method::POST,
            "/kbs/v0/provisioner/provision",
            Some(RequestBody::Json(
                serde_json::json!({ "vm_name": vm_name, "namespace": namespace }),
            )),
        )
        .await
    }

    /// `GET /kbs/v0/provisioner/provision`: the provisioned VMs (no keys).
    pub async fn list_provisioned(&self) -> Result<Value, ClientError> {
        self.send(Method::GET, "/kbs/v0/provisioner/provision", None)
            .await
    }

    /// `DELETE /kbs/v0/provisioner/provision/<uuid>`: erase a VM's disk key.
    pub async fn deprovision(&self, uuid: &str) -> Result<Value, ClientError> {
        self.send(
            Method::DELETE,
            &format!("/kbs/v0/provisioner/provision/{}", path_segment(uuid)),
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_reported_once_with_its_cause() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = AdminClient::new(
            &format!("http://127.0.0.1:{port}"),
            AdminKeyPair::generate(),
            None,
        )
        .unwrap();
        let err = client.resource_versions("default/a/b").await.unwrap_err();
        let reported = err.to_string();
        assert!(matches!(err, ClientError::Http(_)), "{reported}");
        assert!(reported.contains("Connection refused"), "{reported}");
        assert!(std::error::Error::source(&err).is_none(), "{reported}");
    }
}
