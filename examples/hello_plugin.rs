//! `hello`: the smallest plugin that uses every part of the framework, the one
//! `docs/architecture.md` walks through. An attested guest asks
//! `GET /kbs/v0/hello/greeting` and gets the configured greeting with its own guest id, if
//! the resource policy allows it (`data.plugin == "hello"`); the plugin counts greetings in
//! its own metrics scope (`kbs_hello_greetings_total`) and remembers, in its own key-value
//! namespace, how often each guest asked.
//!
//! Added to a KBS with one line: `PluginSpec::new(hello_plugin::NAME, HelloPlugin::build)`
//! (in the built-in list of `server/src/app.rs`, or given to `Kbs::build_with`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use kbs_web::error::ApiError;
use kbs_web::extract::Attested;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::{Value, json};

/// The plugin's name: its URL segment, storage namespace, config section and metrics prefix.
pub const NAME: &str = "hello";

/// `[plugins.hello]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HelloConfig {
    /// What guests are told.
    pub greeting: String,
}

impl Default for HelloConfig {
    fn default() -> Self {
        Self {
            greeting: "hello".into(),
        }
    }
}

/// The `hello` plugin.
pub struct HelloPlugin {
    greeting: Arc<str>,
    greetings: Counter,
}

impl HelloPlugin {
    /// Reads and checks `[plugins.hello]`, registers the plugin's metrics.
    pub fn build(setup: &mut PluginSetup<'_>) -> Result<Self, PluginSetupError> {
        let config: HelloConfig = setup.config()?;
        if config.greeting.is_empty() || config.greeting.len() > 64 {
            return Err(setup.invalid("greeting", "must be 1..=64 bytes"));
        }
        let greetings = Counter::default();
        setup
            .metrics()
            .register("greetings", "Greetings given", greetings.clone());
        Ok(Self {
            greeting: config.greeting.into(),
            greetings,
        })
    }
}

impl Plugin for HelloPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route("/greeting", get(greet))
            .layer(Extension(Greeter {
                greeting: self.greeting.clone(),
                greetings: self.greetings.clone(),
            }))
            .with_state(ctx)
    }
}

#[derive(Clone)]
struct Greeter {
    greeting: Arc<str>,
    greetings: Counter,
}

/// `GET /kbs/v0/hello/greeting`: `{"greeting", "guest_id", "times"}`.
async fn greet(
    State(ctx): State<PluginContext>,
    Extension(greeter): Extension<Greeter>,
    Attested(token): Attested,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    ctx.require_policy(&token.claims, None, &query)?;
    let guest_id = token.identity.guest_id;
    let key = format!("times/{guest_id}");
    let times = match ctx.kv().get(&key).await? {
        Some(raw) => u64::from_be_bytes(raw.try_into().unwrap_or_default()) + 1,
        None => 1,
    };
    ctx.kv().put(&key, &times.to_be_bytes()).await?;
    greeter.greetings.inc();
    Ok(Json(
        json!({"greeting": &*greeter.greeting, "guest_id": guest_id, "times": times}),
    ))
}
