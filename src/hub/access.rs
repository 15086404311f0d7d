//! What a member may do, as its identity says: read on every publish and, for members
//! that may not hear everything, on every delivery; changed when it authenticates,
//! when the auth file is reloaded, and when its access is revoked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::auth::{Identity, Permissions};
use crate::protocol::ProtocolError;

/// One member's identity and permissions. Without authentication it has none, and may
/// do everything.
#[derive(Default)]
pub(crate) struct Access {
    identity: RwLock<Option<Identity>>,
    /// Set when the member may not hear every event: deliveries to it are checked.
    filtered: AtomicBool,
    /// Set when the hub closed its access (identity removed on reload): the
    /// connection tells the client and closes.
    revoked: RwLock<Option<ProtocolError>>,
    is_revoked: AtomicBool,
}

impl Access {
    /// Its permissions (`None`: everything allowed).
    pub(crate) fn permissions(&self) -> Option<Arc<Permissions>> {
        self.read()
            .as_ref()
            .map(|identity| Arc::clone(&identity.permissions))
    }

    /// Its identity, if it authenticated.
    pub(crate) fn identity(&self) -> Option<Identity> {
        self.read().clone()
    }

    /// Sets its identity (on `$hello` or a certificate) or its new permissions (on
    /// reload).
    pub(crate) fn set(&self, identity: Identity) {
        let filtered = !identity.permissions.subscribe.allows_everything();
        *self
            .identity
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(identity);
        self.filtered.store(filtered, Ordering::Release);
    }

    /// Whether it may hear an event named `name` that its subscriptions (or the
    /// allowed patterns standing in for them) matched: `false` when a deny pattern
    /// matches it, or it is not allowed at all.
    pub(crate) fn may_hear(&self, name: &str) -> bool {
        if !self.filtered.load(Ordering::Acquire) {
            return true;
        }
        match self.read().as_ref() {
            Some(identity) => identity.permissions.subscribe.allows(name),
            None => true,
        }
    }

    /// Closes its access: the connection sends `error` and closes.
    pub(crate) fn revoke(&self, error: ProtocolError) {
        *self.revoked.write().unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.is_revoked.store(true, Ordering::Release);
    }

    /// Why its access was closed, once.
    pub(crate) fn take_revoked(&self) -> Option<ProtocolError> {
        if !self.is_revoked.load(Ordering::Acquire) {
            return None;
        }
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Identity>> {
        self.identity.read().unwrap_or_else(PoisonError::into_inner)
    }
}
