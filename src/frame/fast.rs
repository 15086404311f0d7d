//! The fast path: one pass that fully validates a typical event frame and finds its
//! parts, without serde.
//!
//! It answers only "this is a valid, single-line event object, and here are its
//! `event`, `payload` and `room`" or "not sure". Anything unusual (a `\u` escape, an
//! escaped key or name, a duplicate key, a line break outside strings, deep nesting,
//! a missing field, an error of any kind) is "not sure", and the frame goes to the
//! reference path (the structural scanner, then serde_json), which decides it and
//! words any error. So this code never has to explain a rejection, and it can only be
//! wrong by accepting what the reference path rejects or reading parts differently:
//! the `decoder_differential` fuzz target and the property tests compare the two.
//!
//! The validation is JSON's grammar (RFC 8259) as serde_json applies it: strings with
//! no raw control characters, valid UTF-8 and valid escapes; numbers without leading
//! zeros; `true`/`false`/`null`.

use std::ops::Range;

/// Where an event's parts are in its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parts {
    /// One past the object's closing brace.
    pub end: usize,
    /// The event name's text, without quotes (it has no escapes).
    pub name: Range<usize>,
    /// The payload's JSON text.
    pub payload: Range<usize>,
    /// The room name's text, without quotes (it has no escapes).
    pub room: Option<Range<usize>>,
    /// The publisher's `"id"` text, without quotes (a string without escapes; any
    /// other `"id"` goes to the reference path).
    pub id: Option<Range<usize>>,
}

/// Nesting deeper than this goes to the reference path (serde_json's own limit is 128).
const MAX_DEPTH: usize = 64;

/// Validates the object at the start of `buf` (which must start with `{`); `None`
/// means "not sure": let the reference path decide.
pub(crate) fn event(buf: &[u8]) -> Option<Parts> {
    let mut p = Parser { buf, pos: 0 };
    p.eat(b'{')?;
    let (mut name, mut payload, mut room, mut id) = (None, None, None, None);
    loop {
        let key = p.key()?;
        if key.escaped {
            return None;
        }
        p.ws()?;
        let start = p.pos;
        match buf.get(key.text)? {
            b"event" => {
                let text = p.plain_string()?;
                set_once(&mut name, text)?;
            }
            b"payload" => {
                p.value(1)?;
                set_once(&mut payload, start..p.pos)?;
            }
            b"room" => {
                let text = p.plain_string()?;
                set_once(&mut room, text)?;
            }
            b"id" => {
                let text = p.plain_string()?;
                set_once(&mut id, text)?;
            }
            _ => p.value(1)?,
        }
        match p.token()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    Some(Parts {
        end: p.pos,
        name: name?,
        payload: payload?,
        room,
        id,
    })
}

/// A duplicate key is an error for serde: not sure.
fn set_once(slot: &mut Option<Range<usize>>, value: Range<usize>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

struct Str {
    /// The text between the quotes.
    text: Range<usize>,
    escaped: bool,
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Flags (high bit of the byte) the bytes of `word` that a string scan must look at: a
/// quote, a backslash, a control character or a non-ASCII byte. The lowest flagged
/// byte is always one of these (bytes above a flagged one may be flagged wrongly, by
/// the borrow, which is harmless: the scan stops at the lowest).
#[inline(always)]
fn special_bytes(word: u64) -> u64 {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let quote = zero(word ^ (ONES * u64::from(b'"')));
    let backslash = zero(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    quote | backslash | control | (word & HIGHS)
}

/// [`special_bytes`] for 16 bytes at once with SSE2 (part of every x86_64 CPU): one bit
/// per byte, and exact. A signed compare with 0x20 catches control characters and
/// non-ASCII bytes (negative as `i8`) together.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[target_feature(enable = "sse2")]
#[inline]
fn special_bytes_16(chunk: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_set_epi64x,
    };
    let (low, high) = chunk.split_at(8);
    let word = |half: &[u8]| i64::from_le_bytes(half.try_into().unwrap_or_default());
    let bytes = _mm_set_epi64x(word(high), word(low));
    let quote = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'"' as i8));
    let backslash = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'\\' as i8));
    let below_space = _mm_cmplt_epi8(bytes, _mm_set1_epi8(0x20));
    _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), below_space)) as u32
}

impl Parser<'_> {
    /// Moves to the next byte inside a string that a scan must look at (a quote, a
    /// backslash, a control or non-ASCII byte), 16 or 8 bytes at a time; near the end of
    /// the buffer it may stop early, and the caller goes on byte by byte.
    #[inline(always)]
    fn skip_plain(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
        while let Some(chunk) = self
            .buf
            .get(self.pos..self.pos + 16)
            .and_then(|c| <&[u8; 16]>::try_from(c).ok())
        {
            // SAFETY: this code is only compiled where SSE2 is enabled (the cfg above):
            // it is part of the x86_64 baseline, which rustc's x86_64 targets assume.
            let special = unsafe { special_bytes_16(chunk) };
            if special != 0 {
                self.pos += special.trailing_zeros() as usize;
                return;
            }
            self.pos += 16;
        }
        while let Some(chunk) = self.buf.get(self.pos..self.pos + 8) {
            let special = special_bytes(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
            if special != 0 {
                self.pos += (special.trailing_zeros() / 8) as usize;
                return;
            }
            self.pos += 8;
        }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline(always)]
    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    #[inline(always)]
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// Skips spaces and tabs. A line break means the frame must be compacted (the
    /// reference path does that): not sure.
    #[inline(always)]
    fn ws(&mut self) -> Option<()> {
        if self.peek().is_some_and(|b| b > b' ') {
            return Some(());
        }
        loop {
            match self.peek()? {
                b' ' | b'\t' => self.pos += 1,
                b'\n' | b'\r' => return None,
                _ => return Some(()),
            }
        }
    }

    /// The next byte that is not a space or tab (compact JSON: the very next byte).
    #[inline(always)]
    fn token(&mut self) -> Option<u8> {
        let byte = self.next()?;
        if byte > b' ' {
            return Some(byte);
        }
        self.pos -= 1;
        self.ws()?;
        self.next()
    }

    /// `"key" :`, with any spaces around.
    #[inline(always)]
    fn key(&mut self) -> Option<Str> {
        if self.token()? != b'"' {
            return None;
        }
        let key = self.string_body()?;
        (self.token()? == b':').then_some(key)
    }

    #[inline(always)]
    fn plain_string(&mut self) -> Option<Range<usize>> {
        let s = self.string()?;
        (!s.escaped).then_some(s.text)
    }

    #[inline(always)]
    fn string(&mut self) -> Option<Str> {
        self.eat(b'"')?;
        self.string_body()
    }

    /// A string's text and closing quote (the opening quote is behind us).
    #[inline(always)]
    fn string_body(&mut self) -> Option<Str> {
        let start = self.pos;
        let (mut escaped, mut non_ascii) = (false, false);
        loop {
            self.skip_plain();
            match self.next()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    // `\u` escapes (surrogates and all) are left to serde.
                    if !matches!(
                        self.next()?,
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't'
                    ) {
                        return None;
                    }
                }
                0..=0x1f => return None,
                0x80.. => non_ascii = true,
                _ => {}
            }
        }
        let text = start..self.pos - 1;
        if non_ascii {
            std::str::from_utf8(self.buf.get(text.clone())?).ok()?;
        }
        Some(Str { text, escaped })
    }

    /// Scalars are parsed in place; objects and arrays (the recursion) are calls.
    #[inline(always)]
    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    #[inline(never)]
    fn object(&mut self, depth: usize) -> Option<()> {
        self.eat(b'{')?;
        self.ws()?;
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.key()?;
            self.ws()?;
            self.value(depth + 1)?;
            match self.token()? {
                b',' => continue,
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    #[inline(never)]
    fn array(&mut self, depth: usize) -> Option<()> {
        self.eat(b'[')?;
        self.ws()?;
        if self.peek()? == b']' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.ws()?;
            self.value(depth + 1)?;
            match self.token()? {
                b',' => continue,
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.buf.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    #[inline(always)]
    fn number(&mut self) -> Option<()> {
        if self.peek()? == b'-' {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek()? == b'.' {
            self.pos += 1;
            self.some_digits()?;
        }
        if matches!(self.peek()?, b'e' | b'E') {
            self.pos += 1;
            if matches!(self.peek()?, b'+' | b'-') {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    #[inline(always)]
    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    #[inline(always)]
    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> Option<(usize, &str, &str, Option<&str>)> {
        let p = event(text.as_bytes())?;
        Some((
            p.end,
            &text[p.name],
            &text[p.payload],
            p.room.map(|r| &text[r]),
        ))
    }

    #[test]
    fn typical_events_are_read() {
        let text = r#"{"event":"order.created","payload":{"id":1,"a":[true,false,null,-0.5e+3,"x\"y"]},"room":"acme"}{"next""#;
        assert_eq!(
            parts(text),
            Some((
                text.find("}{").unwrap() + 1,
                "order.created",
                r#"{"id":1,"a":[true,false,null,-0.5e+3,"x\"y"]}"#,
                Some("acme")
            ))
        );
        let spaced = "{ \"payload\" :\t\"ü\" , \"x\": {}, \"event\": \"a\" }";
        assert_eq!(parts(spaced), Some((spaced.len(), "a", "\"ü\"", None)));
    }

    #[test]
    fn anything_unusual_is_left_to_the_reference_path() {
        for text in [
            r#"{"event":"a","payload":1"#,              // incomplete
            r#"{"event":"a","payload":01}"#,            // leading zero
            r#"{"event":"a","payload":1.}"#,            // no fraction digits
            r#"{"event":"a","payload":tru}"#,           // bad literal
            r#"{"event":"a","payload":"\u0041"}"#,      // \u escape
            r#"{"event":"a\n","payload":1}"#,           // escaped name
            r#"{"ev\"ent":"a","payload":1}"#,           // escaped key
            r#"{"event":"a","event":"b","payload":1}"#, // duplicate
            r#"{"event":"a"}"#,                         // no payload
            r#"{"event":1,"payload":1}"#,               // name not a string
            r#"{"event":"a","payload":1,"room":null}"#, // room not a string
            "{\"event\":\"a\",\n\"payload\":1}",        // pretty-printed
            "{\"event\":\"a\",\"payload\":\"\x01\"}",   // raw control character
            r#"{"event":"a","payload":[1,]}"#,          // trailing comma
            r#"{"event":"a","payload":1,}"#,            // trailing comma
            r#"{}"#,
        ] {
            assert_eq!(parts(text), None, "{text}");
        }
        let deep = format!(
            r#"{{"event":"a","payload":{}1{}}}"#,
            "[".repeat(70),
            "]".repeat(70)
        );
        assert_eq!(parts(&deep), None);
        let bad_utf8 = b"{\"event\":\"a\",\"payload\":\"\xff\"}";
        assert_eq!(event(bad_utf8), None);
    }

    #[test]
    fn the_word_filter_flags_every_special_byte() {
        for special in [b'"', b'\\', 0x00, 0x1f, 0x80, 0xff] {
            for at in 0..8 {
                let mut chunk = *b"abcdefgh";
                chunk[at] = special;
                let flagged = special_bytes(u64::from_le_bytes(chunk));
                assert_eq!(
                    flagged.trailing_zeros() / 8,
                    at as u32,
                    "{special:#x} at {at}"
                );
            }
        }
        assert_eq!(special_bytes(u64::from_le_bytes(*b"plain ~!")), 0);
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    #[test]
    fn the_16_byte_filter_is_exact() {
        for byte in 0..=255u8 {
            let special = byte == b'"' || byte == b'\\' || !(0x20..0x80).contains(&byte);
            for at in [0, 7, 8, 15] {
                let mut chunk = *b"abcdefghijklmnop";
                chunk[at] = byte;
                let expected = if special { 1 << at } else { 0 };
                // SAFETY: SSE2 is enabled (the cfg above).
                let found = unsafe { special_bytes_16(&chunk) };
                assert_eq!(found, expected, "{byte:#x} at {at}");
            }
        }
    }
}
