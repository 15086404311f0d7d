//! What a member may do, as its identity says: read on every publish and, for members
//! that may not hear everything, on every delivery; changed when it authenticates,
//! when the auth file is reloaded, and when its access is revoked.
//!
//! Small on purpose: every connection carries one, and most (no authentication) never
//! use it. A lock around one boxed state, and flags that say whether there is anything
//! to look at.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::auth::{Identity, Permissions};
use crate::protocol::ProtocolError;

/// The member may not hear every event: deliveries to it are checked.
const FILTERED: u8 = 1;
/// The hub closed its access: the connection tells the client and closes.
const REVOKED: u8 = 2;
/// It has an identity.
const IDENTIFIED: u8 = 4;

/// One member's identity and permissions. Without authentication it has none, and may
/// do everything.
#[derive(Default)]
pub(crate) struct Access {
    state: Mutex<Option<Box<State>>>,
    flags: AtomicU8,
}

#[derive(Default)]
struct State {
    identity: Option<Identity>,
    revoked: Option<ProtocolError>,
}

impl Access {
    fn lock(&self) -> MutexGuard<'_, Option<Box<State>>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// Its permissions (`None`: everything allowed).
    pub(crate) fn permissions(&self) -> Option<Arc<Permissions>> {
        if !self.has(IDENTIFIED) {
            return None;
        }
        self.lock()
            .as_ref()
            .and_then(|state| state.identity.as_ref())
            .map(|identity| Arc::clone(&identity.permissions))
    }

    /// Its identity, if it authenticated.
    pub(crate) fn identity(&self) -> Option<Identity> {
        if !self.has(IDENTIFIED) {
            return None;
        }
        self.lock()
            .as_ref()
            .and_then(|state| state.identity.clone())
    }

    /// Sets its identity (on `$hello` or a certificate) or its new permissions (on
    /// reload).
    pub(crate) fn set(&self, identity: Identity) {
        let filtered = !identity.permissions.subscribe.allows_everything();
        self.lock().get_or_insert_with(Box::default).identity = Some(identity);
        self.flags.fetch_or(IDENTIFIED, Ordering::Release);
        if filtered {
            self.flags.fetch_or(FILTERED, Ordering::Release);
        } else {
            self.flags.fetch_and(!FILTERED, Ordering::Release);
        }
    }

    /// Whether it may hear an event named `name`: `false` when its `subscribe` rules
    /// do not allow it.
    pub(crate) fn may_hear(&self, name: &str) -> bool {
        if !self.has(FILTERED) {
            return true;
        }
        match self.lock().as_ref().and_then(|s| s.identity.as_ref()) {
            Some(identity) => identity.permissions.subscribe.allows(name),
            None => true,
        }
    }

    /// Closes its access: the connection sends `error` and closes.
    pub(crate) fn revoke(&self, error: ProtocolError) {
        self.lock().get_or_insert_with(Box::default).revoked = Some(error);
        self.flags.fetch_or(REVOKED, Ordering::Release);
    }

    /// Why its access was closed, once.
    pub(crate) fn take_revoked(&self) -> Option<ProtocolError> {
        if !self.has(REVOKED) {
            return None;
        }
        self.lock().as_mut().and_then(|state| state.revoked.take())
    }
}
