//! Routing: which subscribers want an event, by name pattern. Pure data structures.
//!
//! Patterns follow NATS conventions: a name is split into segments on `.`; `*` matches
//! exactly one segment; `>` as the last segment matches one or more segments. Wildcards
//! must be whole segments (`order.*`, not `order*`), and segments must not be empty.
//!
//! Matching must not cost O(all subscriptions) per event, so the [`Router`] keeps two
//! indexes: patterns without wildcards in a hash map keyed by the full name (one lookup),
//! and wildcard patterns in a trie of segments, walked once per event along the literal
//! child and the `*` child at each level, collecting `>` subscribers on the way. The walk
//! costs O(segments × wildcard branching), independent of how many clients subscribed.

use std::collections::{HashMap, HashSet};

/// Maps keyed by segments and sets of subscriber keys: foldhash is several times
/// faster than the default SipHash on short strings, and seeded per process.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = HashSet<K, foldhash::fast::RandomState>;
use std::fmt;
use std::hash::Hash;

use crate::event::MAX_EVENT_NAME;
use crate::protocol::{ErrorCode, ProtocolError};

/// A validated subscription pattern.
///
/// # Examples
///
/// ```
/// use hubcast::routing::Pattern;
/// let orders = Pattern::parse("order.*").unwrap();
/// assert!(orders.matches("order.created"));
/// assert!(!orders.matches("order.created.late"));
/// assert!(Pattern::parse("order.>").unwrap().matches("order.created.late"));
/// assert!(Pattern::parse("order*").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Box<str>,
    wildcard: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment<'a> {
    Literal(&'a str),
    Star,
    Tail,
}

fn segment(text: &str) -> Segment<'_> {
    match text {
        "*" => Segment::Star,
        ">" => Segment::Tail,
        other => Segment::Literal(other),
    }
}

impl Pattern {
    /// Validates `text` as a pattern.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::InvalidPattern`] naming the rule broken: empty, too long, an empty
    /// segment, a wildcard inside a segment, or `>` before the last segment.
    pub fn parse(text: &str) -> Result<Pattern, ProtocolError> {
        let invalid = |why: &str| {
            ProtocolError::new(
                ErrorCode::InvalidPattern,
                format!("invalid pattern {}: {why}", crate::protocol::excerpt(text)),
            )
        };
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        if text.len() > MAX_EVENT_NAME {
            return Err(invalid(&format!("longer than {MAX_EVENT_NAME} bytes")));
        }
        let count = text.split('.').count();
        let mut wildcard = false;
        for (i, part) in text.split('.').enumerate() {
            if part.is_empty() {
                return Err(invalid("empty segment (two dots, or a dot at an end)"));
            }
            match segment(part) {
                Segment::Tail if i + 1 != count => {
                    return Err(invalid("'>' may only be the last segment"));
                }
                Segment::Star | Segment::Tail => wildcard = true,
                Segment::Literal(l) if l.contains(['*', '>']) => {
                    return Err(invalid("wildcards must be whole segments, like 'a.*'"));
                }
                Segment::Literal(_) => {}
            }
        }
        Ok(Pattern {
            text: text.into(),
            wildcard,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How many segments it has.
    pub fn segments(&self) -> usize {
        self.text.split('.').count()
    }

    /// Whether it has a `*` or `>` segment.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether event `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        if !self.wildcard {
            return &*self.text == name;
        }
        let mut names = name.split('.');
        for part in self.text.split('.') {
            match segment(part) {
                Segment::Tail => return names.next().is_some(),
                Segment::Star => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if names.next() != Some(l) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }

    /// Whether every name `other` matches is matched by `self` too: `order.>` covers
    /// `order.*` and `order.created`, but `order.*` does not cover `order.>`.
    ///
    /// # Examples
    ///
    /// ```
    /// use hubcast::routing::Pattern;
    /// let p = |t| Pattern::parse(t).unwrap();
    /// assert!(p("order.>").covers(&p("order.*")));
    /// assert!(!p("order.*").covers(&p("order.>")));
    /// assert!(p(">").covers(&p("a.b.c")));
    /// ```
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.text.split('.').map(segment);
        for ours in self.text.split('.').map(segment) {
            let Some(their) = theirs.next() else {
                return false;
            };
            match (ours, their) {
                // One or more segments, whatever they are: `their` is one at least.
                (Segment::Tail, _) => return true,
                (Segment::Star, Segment::Literal(_) | Segment::Star) => {}
                (Segment::Literal(a), Segment::Literal(b)) if a == b => {}
                _ => return false,
            }
        }
        theirs.next().is_none()
    }

    /// Whether some name matches both patterns.
    ///
    /// # Examples
    ///
    /// ```
    /// use hubcast::routing::Pattern;
    /// let p = |t| Pattern::parse(t).unwrap();
    /// assert!(p("order.*").overlaps(&p("*.created")));
    /// assert!(!p("order.*").overlaps(&p("order.a.b")));
    /// assert!(p("order.>").overlaps(&p("*.a.b")));
    /// ```
    pub fn overlaps(&self, other: &Pattern) -> bool {
        let mut theirs = other.text.split('.').map(segment);
        for ours in self.text.split('.').map(segment) {
            let Some(their) = theirs.next() else {
                return false;
            };
            match (ours, their) {
                // `>` takes whatever remains of the other, which has a segment here.
                (Segment::Tail, _) | (_, Segment::Tail) => return true,
                (Segment::Literal(a), Segment::Literal(b)) if a != b => return false,
                _ => {}
            }
        }
        theirs.next().is_none()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Subscriptions of keys (client ids) to patterns, matched without scanning them all.
///
/// A match costs one hash lookup plus a walk of the trie nodes that fit the name,
/// at most two branches (the literal and `*`) per segment: bounded by the name's
/// segments and the patterns' depth, never by how many keys subscribed. Patterns of
/// many segments mixing `*` and literals make that walk wide (issue #10), so the hub
/// limits segments per pattern (`Limits::max_pattern_segments`).
///
/// # Examples
///
/// ```
/// use hubcast::routing::{Pattern, Router};
/// let mut router = Router::default();
/// router.insert(&Pattern::parse("order.*").unwrap(), 1);
/// router.insert(&Pattern::parse("order.created").unwrap(), 2);
/// router.insert(&Pattern::parse(">").unwrap(), 3);
/// let mut who = Vec::new();
/// router.matches("order.created", &mut who);
/// who.sort();
/// assert_eq!(who, [1, 2, 3]);
/// ```
#[derive(Debug)]
pub struct Router<K> {
    exact: Map<Box<str>, Set<K>>,
    root: Node<K>,
    len: usize,
}

/// One level of the wildcard trie. Kept small: most nodes have one child and no keys,
/// and issue #10 found 1,000 long patterns of `a` and `*` costing 57 MB with a hash
/// map and two sets inline in every node (~600 B a node; now ~100 B).
#[derive(Debug)]
struct Node<K> {
    literal: Children<K>,
    star: Option<Box<Node<K>>>,
    /// Keys whose pattern ends with `>` here: they match one or more further segments.
    tail: Keys<K>,
    /// Keys whose pattern ends exactly here.
    end: Keys<K>,
}

/// A node's literal children: a short list (searched in order) until there are many.
#[derive(Debug)]
enum Children<K> {
    Few(Vec<(Box<str>, Node<K>)>),
    Many(Box<Map<Box<str>, Node<K>>>),
}

/// Past this many children a node's literals move into a hash map.
const FEW: usize = 8;

impl<K> Children<K> {
    fn get(&self, part: &str) -> Option<&Node<K>> {
        match self {
            Children::Few(list) => list.iter().find(|(p, _)| &**p == part).map(|(_, n)| n),
            Children::Many(map) => map.get(part),
        }
    }

    fn get_mut(&mut self, part: &str) -> Option<&mut Node<K>> {
        match self {
            Children::Few(list) => list.iter_mut().find(|(p, _)| &**p == part).map(|(_, n)| n),
            Children::Many(map) => map.get_mut(part),
        }
    }

    fn get_or_insert(&mut self, part: &str) -> &mut Node<K> {
        if let Children::Few(list) = self {
            if list.len() >= FEW && !list.iter().any(|(p, _)| &**p == part) {
                let map = std::mem::take(list).into_iter().collect();
                *self = Children::Many(Box::new(map));
            }
        }
        match self {
            Children::Few(list) => {
                let at = match list.iter().position(|(p, _)| &**p == part) {
                    Some(at) => at,
                    None => {
                        list.push((part.into(), Node::default()));
                        list.len() - 1
                    }
                };
                &mut list[at].1
            }
            Children::Many(map) => map.entry(part.into()).or_default(),
        }
    }

    fn remove(&mut self, part: &str) {
        match self {
            Children::Few(list) => list.retain(|(p, _)| &**p != part),
            Children::Many(map) => {
                map.remove(part);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Few(list) => list.is_empty(),
            Children::Many(map) => map.is_empty(),
        }
    }
}

/// A set of keys that is usually absent: one pointer when empty.
type Keys<K> = Option<Box<Set<K>>>;

fn insert_key<K: Eq + Hash>(keys: &mut Keys<K>, key: K) -> bool {
    keys.get_or_insert_with(Box::default).insert(key)
}

fn remove_key<K: Eq + Hash>(keys: &mut Keys<K>, key: &K) -> bool {
    let Some(set) = keys else {
        return false;
    };
    let removed = set.remove(key);
    if set.is_empty() {
        *keys = None;
    }
    removed
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            literal: Children::Few(Vec::new()),
            star: None,
            tail: None,
            end: None,
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.tail.is_none() && self.end.is_none()
    }
}

impl<K> Default for Router<K> {
    fn default() -> Self {
        Router {
            exact: Map::default(),
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash + Ord> Router<K> {
    /// How many (pattern, key) subscriptions it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Subscribes `key` to `pattern`; `false` if it already was.
    pub fn insert(&mut self, pattern: &Pattern, key: K) -> bool {
        let added = if pattern.is_wildcard() {
            let mut node = &mut self.root;
            let mut parts = pattern.as_str().split('.').peekable();
            loop {
                let Some(part) = parts.next() else {
                    break insert_key(&mut node.end, key);
                };
                match segment(part) {
                    Segment::Tail => break insert_key(&mut node.tail, key),
                    Segment::Star => node = node.star.get_or_insert_with(Box::default),
                    Segment::Literal(l) => node = node.literal.get_or_insert(l),
                }
            }
        } else {
            self.exact
                .entry(pattern.as_str().into())
                .or_default()
                .insert(key)
        };
        self.len += usize::from(added);
        added
    }

    /// Unsubscribes `key` from `pattern`; `false` if it was not subscribed.
    pub fn remove(&mut self, pattern: &Pattern, key: K) -> bool {
        let removed = if pattern.is_wildcard() {
            let parts: Vec<&str> = pattern.as_str().split('.').collect();
            remove_in(&mut self.root, &parts, key)
        } else {
            let name = pattern.as_str();
            let removed = self
                .exact
                .get_mut(name)
                .is_some_and(|keys| keys.remove(&key));
            if self.exact.get(name).is_some_and(Set::is_empty) {
                self.exact.remove(name);
            }
            removed
        };
        self.len -= usize::from(removed);
        removed
    }

    /// Whether any pattern matches `name` (no allocation, stops at the first).
    pub fn matches_any(&self, name: &str) -> bool {
        self.exact.contains_key(name) || any_in(&self.root, Some(name))
    }

    /// Appends to `out` every key with a pattern matching `name`, once each, in no
    /// particular order.
    pub fn matches(&self, name: &str, out: &mut Vec<K>) {
        let start = out.len();
        let mut sources = 0;
        if let Some(keys) = self.exact.get(name) {
            out.extend(keys.iter().copied());
            sources += 1;
        }
        walk(&self.root, Some(name), out, &mut sources);
        // Each set holds a key once: duplicates need two sets, so sort only then.
        if sources > 1 {
            let found = &mut out[start..];
            found.sort_unstable();
            let mut unique = start;
            for i in start..out.len() {
                if i == start || out[i] != out[unique - 1] {
                    out[unique] = out[i];
                    unique += 1;
                }
            }
            out.truncate(unique);
        }
    }
}

/// Appends the keys of a non-empty `set` to `out`, counting it as a source.
fn take<K: Copy>(set: &Keys<K>, out: &mut Vec<K>, sources: &mut usize) {
    if let Some(set) = set {
        out.extend(set.iter().copied());
        *sources += 1;
    }
}

/// Collects the keys of every pattern in `node` that matches `rest` (the name's
/// remaining segments; `None` once they are used up).
fn walk<K: Copy>(node: &Node<K>, rest: Option<&str>, out: &mut Vec<K>, sources: &mut usize) {
    let Some(rest) = rest else {
        take(&node.end, out, sources);
        return;
    };
    take(&node.tail, out, sources);
    let (part, after) = match rest.split_once('.') {
        Some((part, after)) => (part, Some(after)),
        None => (rest, None),
    };
    if let Some(child) = node.literal.get(part) {
        walk(child, after, out, sources);
    }
    if let Some(star) = &node.star {
        walk(star, after, out, sources);
    }
}

/// Whether some pattern in `node` matches `rest` (as [`walk`], stopping at the first).
fn any_in<K>(node: &Node<K>, rest: Option<&str>) -> bool {
    let Some(rest) = rest else {
        return node.end.is_some();
    };
    if node.tail.is_some() {
        return true;
    }
    let (part, after) = match rest.split_once('.') {
        Some((part, after)) => (part, Some(after)),
        None => (rest, None),
    };
    node.literal
        .get(part)
        .is_some_and(|child| any_in(child, after))
        || node.star.as_deref().is_some_and(|star| any_in(star, after))
}

/// Removes `key` at the end of `parts`, pruning nodes left empty.
fn remove_in<K: Eq + Hash>(node: &mut Node<K>, parts: &[&str], key: K) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return remove_key(&mut node.end, &key);
    };
    match segment(first) {
        Segment::Tail => remove_key(&mut node.tail, &key),
        Segment::Star => {
            let Some(star) = node.star.as_deref_mut() else {
                return false;
            };
            let removed = remove_in(star, rest, key);
            if star.is_empty() {
                node.star = None;
            }
            removed
        }
        Segment::Literal(l) => {
            let Some(child) = node.literal.get_mut(l) else {
                return false;
            };
            let removed = remove_in(child, rest, key);
            if child.is_empty() {
                node.literal.remove(l);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn pattern_rules() {
        assert!(p("pickup").matches("pickup"));
        assert!(!p("pickup").matches("pickups"));
        assert!(p("order.*").matches("order.new"));
        assert!(!p("order.*").matches("order"));
        assert!(!p("order.*").matches("order.new.late"));
        assert!(p("*.new").matches("order.new"));
        assert!(p("a.*.c").matches("a.b.c"));
        assert!(!p("a.*.c").matches("a.b.d"));
        assert!(p("order.>").matches("order.new"));
        assert!(p("order.>").matches("order.new.late"));
        assert!(
            !p("order.>").matches("order"),
            "'>' needs at least one segment"
        );
        assert!(p(">").matches("anything.at.all"));
        assert!(p("*").matches("in-transit"));
        assert!(!p("*").matches("a.b"));
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a*", "a.b>", "**", "*>"] {
            let err = Pattern::parse(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidPattern, "{bad:?}");
        }
        assert!(Pattern::parse(&"a".repeat(257)).is_err());
    }

    #[test]
    fn router_agrees_with_patterns() {
        let patterns = [
            "a", "a.b", "a.*", "*.b", "a.>", ">", "*", "a.*.c", "*.*.c", "b.>",
        ];
        let names = [
            "a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "b.x.y", "c",
        ];
        let mut router = Router::default();
        for (key, pattern) in patterns.iter().enumerate() {
            assert!(router.insert(&p(pattern), key));
            assert!(!router.insert(&p(pattern), key), "inserted twice");
        }
        assert_eq!(router.len(), patterns.len());
        for name in names {
            let mut got = Vec::new();
            router.matches(name, &mut got);
            got.sort();
            let want: Vec<usize> = (0..patterns.len())
                .filter(|&k| p(patterns[k]).matches(name))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn one_key_matching_twice_is_reported_once() {
        let mut router = Router::default();
        router.insert(&p("a.b"), 7);
        router.insert(&p("a.*"), 7);
        router.insert(&p(">"), 7);
        let mut got = vec![99];
        router.matches("a.b", &mut got);
        assert_eq!(got, [99, 7]);
    }

    #[test]
    fn removal_prunes_and_forgets() {
        let mut router = Router::default();
        router.insert(&p("a.*.c"), 1);
        router.insert(&p("x"), 1);
        assert!(router.remove(&p("a.*.c"), 1));
        assert!(!router.remove(&p("a.*.c"), 1));
        assert!(router.remove(&p("x"), 1));
        assert!(router.is_empty());
        assert!(router.root.is_empty() && router.exact.is_empty());
        let mut got = Vec::new();
        router.matches("a.b.c", &mut got);
        assert!(got.is_empty());
    }
}
