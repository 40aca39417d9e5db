//! [`Callers`]: the external plugins that may call the Guests API, each with its token, its
//! grants, its bound on calls at once and (once the registry has built it) its plugin
//! context, through which its calls are policy-checked and audited as itself.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};

use kbs_web::plugin::PluginContext;
use tokio::sync::Semaphore;

use super::grants::Grants;
use super::token::Token;

/// One external plugin with a `[plugins.external.guests]` grant.
pub struct Caller {
    /// `external/<name>`: the audit actor and metrics label.
    pub name: &'static str,
    /// Its grants.
    pub grants: Grants,
    /// Its calls in progress (a flood waits for nothing: over the bound is refused).
    pub slots: Arc<Semaphore>,
    token_file: PathBuf,
    token: RwLock<Token>,
    ctx: OnceLock<PluginContext>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// Its plugin context, once its routes were built.
    pub fn ctx(&self) -> Option<&PluginContext> {
        self.ctx.get()
    }

    /// Remember the plugin's context (the first one given; the registry gives one).
    pub fn set_ctx(&self, ctx: PluginContext) {
        let _ = self.ctx.set(ctx);
    }

    /// Replace the token with a fresh one in its file; the old one stops working now.
    pub fn rotate_token(&self) -> Result<(), String> {
        let fresh = Token::rotate(&self.token_file)?;
        let mut token = self.token.write().map_err(|_| "token lock poisoned")?;
        *token = fresh;
        Ok(())
    }

    /// Where its token is.
    pub fn token_file(&self) -> &PathBuf {
        &self.token_file
    }

    fn same_token(&self, other: &Token) -> bool {
        self.token.read().is_ok_and(|t| other.matches(t.expose()))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        self.token.read().is_ok_and(|t| t.matches(presented))
    }
}

/// Every caller, shared by the external plugins (which add themselves) and the Guests API.
#[derive(Clone, Debug, Default)]
pub struct Callers {
    list: Arc<RwLock<Vec<Arc<Caller>>>>,
}

impl Callers {
    /// Add plugin `name` with `grants`, its token from (or generated into) `token_file`.
    pub fn add(
        &self,
        name: &'static str,
        grants: Grants,
        max_concurrent: usize,
        token_file: PathBuf,
    ) -> Result<Arc<Caller>, String> {
        let token = Token::load_or_generate(&token_file)?;
        {
            let list = self.list.read().map_err(|_| "callers lock poisoned")?;
            if let Some(other) = list.iter().find(|c| c.name != name && c.same_token(&token)) {
                return Err(format!(
                    "{} holds the same token as {}: each plugin needs its own",
                    token_file.display(),
                    other.name
                ));
            }
        }
        let caller = Arc::new(Caller {
            name,
            grants,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            token_file,
            token: RwLock::new(token),
            ctx: OnceLock::new(),
        });
        let mut list = self.list.write().map_err(|_| "callers lock poisoned")?;
        list.retain(|c| c.name != name);
        list.push(caller.clone());
        Ok(caller)
    }

    /// The caller whose token is `presented`. Every token is compared, in constant time
    /// each, so the answer's timing says nothing about which token came close.
    pub fn authenticate(&self, presented: &[u8]) -> Option<Arc<Caller>> {
        let list = self.list.read().ok()?;
        let mut found = None;
        for caller in list.iter() {
            if caller.matches(presented) && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    }

    /// How many plugins hold a grant.
    pub fn len(&self) -> usize {
        self.list.read().map(|l| l.len()).unwrap_or(0)
    }

    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::guests::GrantsConfig;

    fn grants() -> Grants {
        toml::from_str::<GrantsConfig>("calls = [\"ping\"]\nselector = \"\"\n")
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn each_token_names_its_plugin_and_two_plugins_cannot_share_one() {
        let dir = tempfile::tempdir().unwrap();
        let callers = Callers::default();
        let a = callers
            .add("external/a", grants(), 2, dir.path().join("a.token"))
            .unwrap();
        callers
            .add("external/b", grants(), 2, dir.path().join("b.token"))
            .unwrap();
        let token_a = std::fs::read(dir.path().join("a.token")).unwrap();
        let token_b = std::fs::read(dir.path().join("b.token")).unwrap();
        assert_eq!(callers.authenticate(&token_a).unwrap().name, "external/a");
        assert_eq!(callers.authenticate(&token_b).unwrap().name, "external/b");
        assert!(callers.authenticate(b"").is_none());
        assert!(
            callers
                .authenticate(&token_a[..token_a.len() - 1])
                .is_none()
        );
        a.rotate_token().unwrap();
        assert!(callers.authenticate(&token_a).is_none(), "rotated away");
        let e = callers
            .add("external/c", grants(), 2, dir.path().join("b.token"))
            .unwrap_err();
        assert!(e.contains("external/b"), "{e}");
    }
}
