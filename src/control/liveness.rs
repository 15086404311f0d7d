//! When a connection must hear from its client: the timers behind `$hello
//! {heartbeat}` and the hub's idle timeout.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ErrorCode, ProtocolError};

/// When a connection must hear from its client: the hub's idle timeout, and the
/// heartbeat a client asked for (a `$ping` every interval; two intervals of silence
/// close it).
#[derive(Debug)]
pub(crate) struct Liveness {
    idle: Option<Duration>,
    heartbeat: Option<Duration>,
    last_heard: Instant,
    next_ping: Option<Instant>,
    /// `$ping`s sent and not answered yet: a `$pong` beyond them was not asked for.
    pings_out: u32,
    /// A moment the connection closes at, whatever it sends, and why: the end of the
    /// time to authenticate, or its credentials' expiry. Boxed: without
    /// authentication no connection has one, and each carries the field.
    expiry: Option<Box<(Instant, ErrorCode)>>,
}

/// What the timer asks the connection to do.
pub(crate) enum Due {
    Nothing,
    Ping,
    Close(ProtocolError),
}

impl Liveness {
    pub(crate) fn new(idle: Option<Duration>) -> Self {
        Liveness {
            idle,
            heartbeat: None,
            last_heard: Instant::now(),
            next_ping: None,
            pings_out: 0,
            expiry: None,
        }
    }

    /// Closes the connection at `at` with `code` (`auth_timeout`, `token_expired`)
    /// unless called again first; `None` clears it.
    pub(crate) fn set_expiry(&mut self, expiry: Option<(Instant, ErrorCode)>) {
        self.expiry = expiry.map(Box::new);
    }

    /// Records that the client sent something.
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Takes a `$pong`: `false` if no `$ping` was waiting for one.
    pub(crate) fn answered(&mut self) -> bool {
        let asked = self.pings_out > 0;
        self.pings_out = self.pings_out.saturating_sub(1);
        asked
    }

    pub(crate) fn set_heartbeat(&mut self, every: Duration) {
        self.heartbeat = Some(every);
        self.next_ping = Instant::now().checked_add(every);
    }

    /// The next moment something is due, if any timer is set.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        // Checked: a deadline past the clock's range is never (no overflow panic).
        let idle = self.idle.and_then(|d| self.last_heard.checked_add(d));
        let silent = self
            .heartbeat
            .and_then(|d| self.last_heard.checked_add(d.saturating_mul(2)));
        let expiry = self.expiry.as_deref().map(|&(at, _)| at);
        [idle, silent, self.next_ping, expiry]
            .into_iter()
            .flatten()
            .min()
    }

    /// Decides what is due now.
    pub(crate) fn fire(&mut self) -> Due {
        let now = Instant::now();
        let quiet = now.saturating_duration_since(self.last_heard);
        if let Some(&(_, code)) = self.expiry.as_deref().filter(|&&(at, _)| at <= now) {
            let why = match code {
                ErrorCode::AuthTimeout => "no $hello with credentials arrived in time",
                _ => "the connection's token expired and no fresh one was sent with $hello",
            };
            return Due::Close(ProtocolError::new(
                code,
                format!("{why}; closing the connection"),
            ));
        }
        if let Some(idle) = self.idle.filter(|&d| quiet >= d) {
            return Due::Close(ProtocolError::new(
                ErrorCode::IdleTimeout,
                format!("nothing received for {idle:?}; closing the connection"),
            ));
        }
        if let Some(every) = self.heartbeat.filter(|&d| quiet >= d * 2) {
            return Due::Close(ProtocolError::new(
                ErrorCode::HeartbeatTimeout,
                format!(
                    "no answer to heartbeats for {:?}; closing the connection",
                    every * 2
                ),
            ));
        }
        match (self.next_ping, self.heartbeat) {
            (Some(at), Some(every)) if at <= now => {
                self.next_ping = now.checked_add(every);
                self.pings_out = self.pings_out.saturating_add(1);
                Due::Ping
            }
            _ => Due::Nothing,
        }
    }
}
