//! Permissions: what an identity may publish, hear, join and consume.
//!
//! Each of the four is a [`Rule`]: an allow list and a deny list of patterns (the
//! `$subscribe` patterns: `*` one segment, `>` the rest), deny winning, nothing allowed
//! unless a pattern allows it. `{user}` in a pattern is the identity's name, as
//! Mosquitto's `%u`. Names are checked against the lists through two [`Router`]s, so a
//! check costs the same with 1 rule or 1,000 (a walk along the name's segments), the
//! way nats-server keeps its permission checks off the hot path.

use serde::{Deserialize, Serialize};

use crate::routing::{Pattern, Router};

/// An allow list and a deny list, as written in the auth file or a JWT claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Patterns that are allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Patterns that are denied, even where `allow` allows them.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The permission tables of a user in the auth file, or of the `hubcast` claim of a
/// JWT. A missing table allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionSpec {
    /// Event names it may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<RuleSpec>,
    /// Event names it may hear (and subscribe to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<RuleSpec>,
    /// Rooms it may join and send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<RuleSpec>,
    /// Durable consumers it may use, as `STREAM/CONSUMER` (a pattern each side; a
    /// rule without `/` names streams, any consumer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume: Option<RuleSpec>,
    /// Whether it may see the hub's stats and dashboard.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

impl PermissionSpec {
    /// Everything allowed: what a connection has when the hub has no authentication.
    pub fn everything() -> Self {
        let all = || {
            Some(RuleSpec {
                allow: vec![">".into()],
                deny: Vec::new(),
            })
        };
        PermissionSpec {
            publish: all(),
            subscribe: all(),
            rooms: all(),
            consume: all(),
            admin: true,
        }
    }

    /// The rules for the identity `user`, with `{user}` replaced by its name.
    ///
    /// # Errors
    ///
    /// The first pattern that is not a valid pattern once `{user}` is replaced, named.
    pub fn compile(&self, user: &str) -> Result<Permissions, String> {
        Ok(Permissions {
            publish: Rule::compile(self.publish.as_ref(), user, "publish")?,
            subscribe: Rule::compile(self.subscribe.as_ref(), user, "subscribe")?,
            rooms: Rule::compile(self.rooms.as_ref(), user, "rooms")?,
            consume: ConsumeRule::compile(self.consume.as_ref(), user)?,
            admin: self.admin,
        })
    }
}

/// An identity's compiled permissions.
#[derive(Debug)]
pub struct Permissions {
    /// Event names it may send.
    pub publish: Rule,
    /// Event names it may hear.
    pub subscribe: Rule,
    /// Rooms it may join and send to.
    pub rooms: Rule,
    /// Durable consumers it may use.
    pub consume: ConsumeRule,
    /// Stats and dashboard.
    pub admin: bool,
}

/// One compiled allow/deny list.
#[derive(Debug, Default)]
pub struct Rule {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
    allow_index: Router<()>,
    deny_index: Router<()>,
    /// `allow` holds `>` and `deny` is empty: no check needed.
    everything: bool,
}

impl Rule {
    fn compile(spec: Option<&RuleSpec>, user: &str, table: &str) -> Result<Rule, String> {
        let mut rule = Rule::default();
        let Some(spec) = spec else {
            return Ok(rule);
        };
        for (list, index, texts, kind) in [
            (&mut rule.allow, &mut rule.allow_index, &spec.allow, "allow"),
            (&mut rule.deny, &mut rule.deny_index, &spec.deny, "deny"),
        ] {
            for text in texts {
                let pattern = substitute(text, user, &format!("{table}.{kind}"))?;
                index.insert(&pattern, ());
                list.push(pattern);
            }
        }
        rule.everything = rule.deny.is_empty() && rule.allow.iter().any(|p| p.as_str() == ">");
        Ok(rule)
    }

    /// Whether everything is allowed (no check needed).
    pub fn allows_everything(&self) -> bool {
        self.everything
    }

    /// Whether the name (an event name or a room) is allowed.
    pub fn allows(&self, name: &str) -> bool {
        self.everything
            || (self.allow_index.matches_any(name) && !self.deny_index.matches_any(name))
    }

    /// Whether each name is allowed, in order: for a run of events, where one name
    /// usually repeats, each name is checked once in a row.
    pub fn allows_each<'a>(
        &'a self,
        names: impl Iterator<Item = &'a str> + 'a,
    ) -> impl Iterator<Item = bool> + 'a {
        let mut last: Option<(&str, bool)> = None;
        names.map(move |name| match last {
            Some((previous, verdict)) if previous == name => verdict,
            _ => {
                let verdict = self.allows(name);
                last = Some((name, verdict));
                verdict
            }
        })
    }

    /// Whether a pattern is allowed: everything it could match is allowed (some
    /// allowed pattern covers it, and no denied one overlaps it).
    pub fn allows_pattern(&self, pattern: &Pattern) -> bool {
        self.everything
            || (self.allow.iter().any(|a| a.covers(pattern))
                && !self.deny.iter().any(|d| d.overlaps(pattern)))
    }

    /// Whether a name that an allowed pattern already matched is denied.
    pub fn denies(&self, name: &str) -> bool {
        !self.deny.is_empty() && self.deny_index.matches_any(name)
    }

    /// The allowed patterns: what a connection that never subscribes hears.
    pub fn allowed(&self) -> &[Pattern] {
        &self.allow
    }
}

/// The `consume` table: `STREAM/CONSUMER` pairs of patterns.
#[derive(Debug, Default)]
pub struct ConsumeRule {
    allow: Vec<(Pattern, Pattern)>,
    deny: Vec<(Pattern, Pattern)>,
}

impl ConsumeRule {
    fn compile(spec: Option<&RuleSpec>, user: &str) -> Result<ConsumeRule, String> {
        let mut rule = ConsumeRule::default();
        let Some(spec) = spec else {
            return Ok(rule);
        };
        for (list, texts, kind) in [
            (&mut rule.allow, &spec.allow, "allow"),
            (&mut rule.deny, &spec.deny, "deny"),
        ] {
            for text in texts {
                let place = format!("consume.{kind}");
                let (stream, consumer) = text.split_once('/').unwrap_or((text, ">"));
                list.push((
                    substitute(stream, user, &place)?,
                    substitute(consumer, user, &place)?,
                ));
            }
        }
        Ok(rule)
    }

    /// Whether consumer `consumer` of stream `stream` may be used.
    pub fn allows(&self, stream: &str, consumer: &str) -> bool {
        let hit = |(s, c): &(Pattern, Pattern)| s.matches(stream) && c.matches(consumer);
        self.allow.iter().any(hit) && !self.deny.iter().any(hit)
    }
}

/// `text` with `{user}` replaced, as a pattern.
fn substitute(text: &str, user: &str, place: &str) -> Result<Pattern, String> {
    let text = text.replace("{user}", user);
    Pattern::parse(&text).map_err(|e| format!("{place}: {}", e.message))
}

/// Whether `name` can stand for `{user}` in a pattern without widening it: not empty,
/// at most 128 bytes, no wildcard or pattern syntax, no whitespace or control
/// characters. (A user named `>` would otherwise be allowed everything.)
pub fn valid_identity(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("an identity's name must be 1 to 128 bytes".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '*' | '>' | '/' | '{' | '}') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "an identity's name may not contain {c:?} (wildcards, '/', braces, spaces)"
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(
            "an identity's name may not have empty segments (a dot at an end, or two)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: &[&str], deny: &[&str]) -> Rule {
        let spec = RuleSpec {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        };
        Rule::compile(Some(&spec), "acme", "publish").unwrap()
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_by_default() {
        let r = rule(&["order.>"], &["order.secret"]);
        assert!(r.allows("order.created"));
        assert!(!r.allows("order.secret"));
        assert!(!r.allows("pickup"));
        assert!(!Rule::default().allows("anything"));
        assert!(rule(&[">"], &[]).allows_everything());
        assert!(!rule(&[">"], &["x"]).allows_everything());
    }

    #[test]
    fn user_is_substituted() {
        let r = rule(&["room.{user}"], &[]);
        assert!(r.allows("room.acme"));
        assert!(!r.allows("room.other"));
    }

    #[test]
    fn patterns_must_be_wholly_allowed() {
        let r = rule(&["order.>"], &["order.secret.*"]);
        let p = |t| Pattern::parse(t).unwrap();
        assert!(r.allows_pattern(&p("order.created")));
        assert!(r.allows_pattern(&p("order.*")));
        // Could match order.secret.x.
        assert!(!r.allows_pattern(&p("order.>")));
        assert!(!r.allows_pattern(&p("*.created")));
        assert!(!r.allows_pattern(&p(">")));
    }

    #[test]
    fn consume_rules_pair_stream_and_consumer() {
        let spec = RuleSpec {
            allow: vec!["orders/vendor-{user}".into(), "audit".into()],
            deny: vec![],
        };
        let r = ConsumeRule::compile(Some(&spec), "acme").unwrap();
        assert!(r.allows("orders", "vendor-acme"));
        assert!(!r.allows("orders", "vendor-other"));
        assert!(r.allows("audit", "anyone"));
        assert!(!r.allows("orders.dead", "vendor-acme"));
    }

    #[test]
    fn identities_cannot_widen_patterns() {
        for bad in [">", "a*", "a b", "", "a..b", "x/y", "{user}"] {
            assert!(valid_identity(bad).is_err(), "{bad:?}");
        }
        for good in ["vendor-acme", "alice@example.com", "CN=x"] {
            valid_identity(good).unwrap();
        }
    }
}
