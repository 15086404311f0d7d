//! Framing: cuts a client's byte stream into frames. Pure code over bytes, no I/O.
//!
//! Clients may put anything between JSON values: a newline, other whitespace, or
//! nothing at all (Node's `socket.write(JSON.stringify(msg))` in a loop). So frame ends
//! are found by reading JSON structure, not delimiters: one pass over each byte tracks
//! nesting depth, strings and escapes, and remembers where it stopped, so a frame that
//! arrives in many reads is scanned once, never re-parsed from its start.
//!
//! * A value starting with `{` or `[` ends at its matching bracket. Objects become
//!   [`Event`]s (or are rejected); arrays are `not_an_event`.
//! * A scalar (a string, number, `true`, `false`, `null`) ends where its token ends,
//!   and is `not_an_event` at once: a class-style client that writes `"hi"` or `42`
//!   before its events is told so, and its events still arrive (issue #10).
//! * Bytes that cannot start or continue JSON are `invalid_json` as soon as they are
//!   seen (an unfinished object is checked while it arrives, at doubling lengths). The
//!   decoder then *resynchronises* at the next newline, or at the next `{` that begins
//!   a valid object, whichever comes first; what lies between is dropped, unbuffered,
//!   and answered by that one error.
//! * A frame longer than the limit is fatal: [`FrameDecoder::decode`] returns `Err` as
//!   soon as the frame in progress passes the limit, before more of it is buffered;
//!   so is more than the limit of garbage with no place to resynchronise.
//! * A UTF-8 byte order mark at the very start of the stream is skipped.
//!
//! Typical frames take a fast path: when a frame starts, one hand-written pass
//! (`fast.rs`) validates the whole object and finds its parts. Whatever it is not sure
//! of (an incomplete frame, an unusual or invalid one) takes the reference path: the
//! resumable scanner above, then serde_json, which decides and words every error.

pub(crate) mod fast;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::event::Event;
use crate::protocol::{ErrorCode, ProtocolError};

/// The default maximum frame length: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// One decoded frame.
#[derive(Debug)]
pub enum Frame {
    /// A valid event, its wire line ready to forward.
    Event(Event),
    /// A bad frame that was skipped; the stream goes on after it.
    Rejected(ProtocolError),
}

/// A run of consecutive plain events taken off the buffer as one `\n`-delimited
/// chunk: what [`FrameDecoder::decode_run`] returns.
///
/// Plain means: valid, not a control event (`$...`), no `"room"`. Everyone who hears
/// one plain event from a sender hears them all, so a connection can queue the whole
/// chunk to each receiver at once instead of event by event.
#[derive(Debug, Default)]
pub struct Run {
    bytes: Bytes,
    events: Vec<RunEvent>,
}

#[derive(Debug)]
struct RunEvent {
    /// Where the event's line starts in the chunk.
    start: usize,
    /// Its parts, relative to `start`.
    parts: fast::Parts,
}

impl Run {
    /// The events' lines, each ending in `\n`, back to back.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Lets go of the chunk (the receivers hold their own references to it).
    pub fn clear(&mut self) {
        self.bytes = Bytes::new();
        self.events.clear();
    }

    /// How many events the run holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the run holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The name of event `index`.
    ///
    /// A run holds only events the decoder validated: their names are UTF-8 by
    /// construction. [`Run::name`] and [`Run::event`] treat a broken invariant the same
    /// way (a panic naming it, never a silently wrong answer); the property tests check
    /// both on every run they decode, against the frame-by-frame decoder, and the
    /// differential fuzz target does the same on arbitrary input.
    ///
    /// # Panics
    ///
    /// If `index` is out of bounds, or on the broken invariant above.
    pub fn name(&self, index: usize) -> &str {
        std::str::from_utf8(self.name_bytes(index)).expect("a run holds valid events only")
    }

    /// Event `index`'s name as bytes, unchecked.
    fn name_bytes(&self, index: usize) -> &[u8] {
        let event = &self.events[index];
        let at = event.start + event.parts.name.start..event.start + event.parts.name.end;
        &self.bytes[at]
    }

    /// Calls `each(name, count)` for every stretch of consecutive events with the same
    /// name (a run is mostly one). Names are compared as bytes in one pass over the
    /// events; only each stretch's name is read as text.
    pub(crate) fn name_stretches(&self, mut each: impl FnMut(&str, u64)) {
        let bytes: &[u8] = &self.bytes;
        let Some(first) = self.events.first() else {
            return;
        };
        // Names of up to 8 bytes (most) are compared as one masked 8-byte load: a line
        // always goes on at least 8 bytes past its name (`","payload":`...), and a call
        // to memcmp per event cost more than all the rest of the counting (callgrind).
        let n = bytes.len();
        let load = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        // (position, length, mask and masked word when the name is short enough)
        let key = |event: &RunEvent| {
            let at = event.start + event.parts.name.start;
            let len = event.parts.name.len();
            let mask = match len {
                1..=8 if at + 8 <= n => u64::MAX >> (64 - 8 * len),
                _ => 0,
            };
            let word = if mask == 0 { 0 } else { load(at) & mask };
            (at, len, mask, word)
        };
        let (mut start, mut count) = (0, 0u64);
        let (mut at, mut len, mut mask, mut word) = key(first);
        for event in &self.events {
            let next_at = event.start + event.parts.name.start;
            let same = event.parts.name.len() == len
                && if mask != 0 && next_at + 8 <= n {
                    load(next_at) & mask == word
                } else {
                    bytes[next_at..next_at + len] == bytes[at..at + len]
                };
            if !same {
                each(self.name(start), count);
                start += count as usize;
                (at, len, mask, word) = key(event);
                count = 0;
            }
            count += 1;
        }
        each(self.name(start), count);
    }

    /// Event `index`'s line, in an allocation of its own: a slice would keep the whole
    /// chunk alive for as long as any one receiver holds the line (issue #10).
    ///
    /// # Panics
    ///
    /// If `index` is out of bounds.
    pub fn line(&self, index: usize) -> Bytes {
        let event = &self.events[index];
        Bytes::copy_from_slice(&self.bytes[event.start..event.start + event.parts.end + 1])
    }

    /// Event `index`'s line (`\n` included), borrowed from the run's chunk: to copy
    /// elsewhere (the backplane's send buffer), never to queue.
    pub(crate) fn line_slice(&self, index: usize) -> &[u8] {
        let event = &self.events[index];
        &self.bytes[event.start..event.start + event.parts.end + 1]
    }

    /// Event `index` on its own, sharing the run's chunk (no copy: this is what an
    /// observer is shown; do not queue it to a client, see [`Run::line`]).
    ///
    /// # Panics
    ///
    /// If `index` is out of bounds, or (a broken invariant, which the decoder's tests
    /// and fuzzing rule out) if the event does not re-validate.
    pub fn event(&self, index: usize) -> Event {
        let event = &self.events[index];
        let line = self
            .bytes
            .slice(event.start..event.start + event.parts.end + 1);
        Event::from_parts(line, event.parts.clone()).expect("a run holds valid events only")
    }
}

/// Incremental decoder for one connection's inbound bytes.
///
/// # Examples
///
/// ```
/// use bytes::BytesMut;
/// use hubcast::frame::{Frame, FrameDecoder};
///
/// let mut decoder = FrameDecoder::new(1024);
/// let mut buf = BytesMut::from(&br#"{"event":"a","payload":1}{"event":"b","#[..]);
/// let Some(Frame::Event(first)) = decoder.decode(&mut buf).unwrap() else { panic!() };
/// assert_eq!(first.name().as_str(), "a");
/// assert!(decoder.decode(&mut buf).unwrap().is_none()); // the second is incomplete
/// buf.extend_from_slice(br#""payload":2}"#);
/// let Some(Frame::Event(second)) = decoder.decode(&mut buf).unwrap() else { panic!() };
/// assert_eq!(&second.line()[..], &b"{\"event\":\"b\",\"payload\":2}\n"[..]);
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    scan: Scan,
    /// Try the fast path first (always, but for differential testing).
    fast: bool,
    /// Nothing but whitespace seen yet: a UTF-8 byte order mark is skipped.
    at_start: bool,
    /// Bytes dropped since the stream was last in sync (garbage, failed candidates).
    garbage: usize,
    /// While out of sync after a broken object or array: its brackets, still being
    /// followed, so the stream is in sync again after its end. While a candidate is
    /// tried, the state just before the candidate's `{`.
    outer: Option<Structure>,
}

/// Where a scan is in JSON's nesting: enough to find where a value ends.
#[derive(Debug, Default, Clone, Copy)]
struct Structure {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Structure {
    /// Takes one byte; `true` when it closes the outermost bracket.
    fn step(&mut self, byte: u8) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            return false;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Progress through the frame at the start of the buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    kind: Kind,
    /// Next byte to look at; the frame always starts at index 0.
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A raw CR or LF outside strings: the frame must be compacted onto one line.
    multiline: bool,
    /// The frame began after garbage: if it proves invalid, it is more of the same
    /// garbage (already answered), not a new error.
    candidate: bool,
    /// The frame's first `checked` bytes were found valid (so far) by serde.
    checked: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Between frames: whitespace is skipped.
    #[default]
    Idle,
    /// An object or array, ended by its matching bracket.
    Nested,
    /// A string, number or literal, ended where its token ends.
    Scalar,
    /// Out of sync: looking for a newline, or a `{` that begins a valid object.
    Garbage,
}

enum Step {
    Incomplete,
    /// The frame is `buf[..end]`.
    End(usize),
    /// A raw newline inside a string at this index.
    BrokenString(usize),
}

/// What one step of decoding produced.
enum Out {
    Frame(Frame),
    /// Wait for more bytes.
    More,
    /// Keep going (the state changed, nothing to report).
    Again,
}

/// What serde says of bytes as the start, or the whole, of one JSON value.
enum Verdict {
    Valid,
    /// Valid so far; more bytes could finish it.
    Incomplete,
    Invalid(ProtocolError),
}

/// Unfinished frames up to this size are checked on every read (see `check_early`).
const EAGER_CHECK: usize = 4096;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            scan: Scan::default(),
            fast: true,
            at_start: true,
            garbage: 0,
            outer: None,
        }
    }

    /// A decoder that never takes the fast path: the reference the fast path is
    /// tested against (property tests, the `decoder_differential` fuzz target).
    #[doc(hidden)]
    pub fn reference(max_frame: usize) -> Self {
        FrameDecoder {
            fast: false,
            ..Self::new(max_frame)
        }
    }

    /// The frame limit in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// How many more bytes may be buffered before the frame in progress is too large.
    ///
    /// Reading at most this much keeps the buffer bounded by the frame limit.
    pub fn read_limit(&self, buf: &BytesMut) -> usize {
        (self.max_frame + 1).saturating_sub(buf.len()).max(1)
    }

    /// Takes the next frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet (it keeps what it has
    /// scanned), `Ok(Some(frame))` for each event or recoverable rejection.
    ///
    /// # Errors
    ///
    /// A fatal [`ProtocolError`] when the stream cannot be resynchronised: a frame over
    /// the limit (`frame_too_large`), or that many bytes of garbage with no newline
    /// (`invalid_json`). The caller should report it and close the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let out = match self.scan.kind {
                Kind::Idle => self.start_frame(buf)?,
                Kind::Nested => self.decode_nested(buf)?,
                Kind::Scalar => self.decode_scalar(buf)?,
                Kind::Garbage => self.skip_garbage(buf)?,
            };
            match out {
                Out::Frame(frame) => return Ok(Some(frame)),
                Out::More => return Ok(None),
                Out::Again => {}
            }
        }
    }

    /// Between frames: skips whitespace (and a leading byte order mark) and looks at
    /// the first byte of the next frame.
    fn start_frame(&mut self, buf: &mut BytesMut) -> Result<Out, ProtocolError> {
        let skip = buf.iter().position(|&b| !is_ws(b)).unwrap_or(buf.len());
        buf.advance(skip);
        if self.at_start {
            if buf.starts_with(BOM) {
                buf.advance(BOM.len());
                self.at_start = false;
                return Ok(Out::Again);
            }
            if !buf.is_empty() && BOM.starts_with(buf) {
                return Ok(Out::More);
            }
        }
        let Some(&first) = buf.first() else {
            return Ok(Out::More);
        };
        self.at_start = false;
        if first == b'{' && self.fast {
            if let Some(frame) = self.fast_path(buf) {
                return Ok(Out::Frame(frame));
            }
        }
        let kind = match first {
            b'{' | b'[' => Kind::Nested,
            b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => Kind::Scalar,
            // Nothing JSON starts with this: say so now, then resynchronise.
            _ => {
                self.scan = Scan::default();
                let error = match verdict(&buf[..1]) {
                    Verdict::Invalid(error) => error,
                    _ => ProtocolError::new(ErrorCode::InvalidJson, "expected a JSON value"),
                };
                return Ok(self.fail(buf, error));
            }
        };
        self.scan = Scan {
            kind,
            ..Scan::default()
        };
        Ok(Out::Again)
    }

    /// Takes as many plain events (see [`Run`]) as there are, complete, at the front of
    /// `buf`, as one chunk; returns `false` (leaving `buf` alone) if the first frame is
    /// not one: then [`decode`](Self::decode) handles it.
    ///
    /// Newline-delimited input is shared, not copied; other separators (none, CRLF,
    /// blank lines) are normalised to one `\n` per event in a copy.
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use hubcast::frame::{FrameDecoder, Run};
    ///
    /// let mut decoder = FrameDecoder::new(1024);
    /// let mut buf = BytesMut::from(&b"{\"event\":\"a\",\"payload\":1}{\"event\":\"b\",\"payload\":2}\r\n{\"event\":\"$ping\",\"payload\":3}\n"[..]);
    /// let mut run = Run::default();
    /// assert!(decoder.decode_run(&mut buf, &mut run));
    /// assert_eq!(run.len(), 2);
    /// assert_eq!(&run.bytes()[..], &b"{\"event\":\"a\",\"payload\":1}\n{\"event\":\"b\",\"payload\":2}\n"[..]);
    /// assert_eq!(run.name(1), "b");
    /// // A control event is not plain: `decode` takes it.
    /// assert!(!decoder.decode_run(&mut buf, &mut run));
    /// assert!(decoder.decode(&mut buf).unwrap().is_some());
    /// ```
    pub fn decode_run(&mut self, buf: &mut BytesMut, run: &mut Run) -> bool {
        run.events.clear();
        if !self.fast || self.scan.kind != Kind::Idle {
            return false;
        }
        if self.at_start {
            // A byte order mark (or the start of one) is `decode`'s to skip.
            match buf.iter().find(|&&b| !is_ws(b)) {
                Some(&b) if b == BOM[0] => return false,
                Some(_) => self.at_start = false,
                None => return false,
            }
        }
        // `exact`: the input is the output (events back to back, each ending in `\n`).
        let (mut pos, mut exact) = (0, true);
        while let Some(start) = buf
            .get(pos..)
            .and_then(|rest| rest.iter().position(|&b| !is_ws(b)))
            .map(|skip| pos + skip)
        {
            let window = &buf[start..buf.len().min(start + self.max_frame + 1)];
            if window.first() != Some(&b'{') {
                break;
            }
            let Some(parts) = fast::event(window) else {
                break;
            };
            let name = &window[parts.name.clone()];
            if parts.end > self.max_frame
                || parts.room.is_some()
                || parts.id.is_some()
                || name.is_empty()
                || name.len() > crate::event::MAX_EVENT_NAME
                || name[0] == b'$'
            {
                break;
            }
            exact &= start == pos;
            pos = start + parts.end;
            if window.get(parts.end) == Some(&b'\n') {
                pos += 1;
            } else {
                exact = false;
            }
            run.events.push(RunEvent { start, parts });
        }
        if run.events.is_empty() {
            return false;
        }
        if exact {
            // Copied, not split off: see `cut_line`.
            run.bytes = Bytes::copy_from_slice(&buf[..pos]);
            buf.advance(pos);
            return true;
        }
        let size = run.events.iter().map(|e| e.parts.end + 1).sum();
        let mut out = BytesMut::with_capacity(size);
        for event in &mut run.events {
            out.put_slice(&buf[event.start..event.start + event.parts.end]);
            out.put_u8(b'\n');
            event.start = out.len() - event.parts.end - 1;
        }
        buf.advance(pos);
        run.bytes = out.freeze();
        true
    }

    /// Tells whether a frame was cut short: bytes of an unfinished frame are buffered.
    ///
    /// Call at end of stream to report a frame the peer never finished.
    pub fn has_partial(&self, buf: &BytesMut) -> bool {
        // Garbage (and frames begun after it) was answered already.
        let answered = self.scan.kind == Kind::Garbage || self.scan.candidate;
        !answered && buf.iter().any(|&b| !is_ws(b))
    }

    fn decode_nested(&mut self, buf: &mut BytesMut) -> Result<Out, ProtocolError> {
        match self.scan_nested(buf) {
            Step::Incomplete => {
                self.check_len(buf.len(), ErrorCode::FrameTooLarge)?;
                Ok(self.check_early(buf))
            }
            // A raw newline inside a string is never valid JSON: the frame is broken.
            Step::BrokenString(newline) => {
                let error = match verdict(&buf[..=newline]) {
                    Verdict::Invalid(error) => error,
                    _ => ProtocolError::new(
                        ErrorCode::InvalidJson,
                        "unterminated string: a raw newline inside a JSON string",
                    ),
                };
                Ok(self.fail(buf, error))
            }
            Step::End(end) => {
                self.check_len(end, ErrorCode::FrameTooLarge)?;
                Ok(self.complete(buf, end))
            }
        }
    }

    /// A whole object or array is `buf[..end]`: judge it.
    fn complete(&mut self, buf: &mut BytesMut, end: usize) -> Out {
        let multiline = self.scan.multiline;
        if buf.first() == Some(&b'[') {
            return match verdict(&buf[..end]) {
                Verdict::Invalid(error) => self.fail(buf, error),
                _ => {
                    buf.advance(end);
                    self.in_sync();
                    Out::Frame(Frame::Rejected(ProtocolError::new(
                        ErrorCode::NotAnEvent,
                        "an event must be a JSON object with \"event\" and \"payload\"",
                    )))
                }
            };
        }
        if self.fast && !multiline {
            // Cheaper than serde for a valid frame, even when complete.
            if let Some(parts) = fast::event(&buf[..end]).filter(|p| p.end == end) {
                let line = cut_line(buf, end, false);
                self.in_sync();
                return Out::Frame(event_frame(Event::from_parts(line, parts)));
            }
        }
        // Judged as written: only valid JSON is compacted (issue #10: compacting first
        // turned `[1 2 3]` into `[123]`).
        let mut copy = BytesMut::with_capacity(end + 1);
        copy.put_slice(&buf[..end]);
        copy.put_u8(b'\n');
        match Event::from_line(copy.freeze()) {
            Err(error) if is_syntax(error.code) => self.fail(buf, error),
            Err(error) => {
                buf.advance(end);
                self.in_sync();
                Out::Frame(Frame::Rejected(error))
            }
            Ok(event) if !multiline => {
                let newline = usize::from(buf.get(end) == Some(&b'\n'));
                buf.advance(end + newline);
                self.in_sync();
                // The copy above is the line, with its `\n` added.
                Out::Frame(Frame::Event(event))
            }
            Ok(_) => {
                let line = cut_line(buf, end, true);
                self.in_sync();
                Out::Frame(event_frame(Event::from_line(line)))
            }
        }
    }

    /// A string, number or literal at the start of `buf`.
    fn decode_scalar(&mut self, buf: &mut BytesMut) -> Result<Out, ProtocolError> {
        let end = if buf.first() == Some(&b'"') {
            match self.scan_string(buf) {
                Step::Incomplete => None,
                Step::End(end) => Some(end),
                Step::BrokenString(newline) => Some(newline + 1),
            }
        } else {
            let from = self.scan.pos.max(1);
            let token = buf[from..].iter().position(|&b| !is_token_byte(b));
            self.scan.pos = token.map_or(buf.len(), |at| from + at);
            token.map(|at| from + at)
        };
        let Some(end) = end else {
            self.check_len(buf.len(), ErrorCode::InvalidJson)?;
            return Ok(self.check_early(buf));
        };
        self.check_len(end, ErrorCode::InvalidJson)?;
        Ok(match verdict(&buf[..end]) {
            Verdict::Invalid(error) => self.fail(buf, error),
            _ => {
                buf.advance(end);
                self.in_sync();
                Out::Frame(Frame::Rejected(ProtocolError::new(
                    ErrorCode::NotAnEvent,
                    "an event must be a JSON object with \"event\" and \"payload\"",
                )))
            }
        })
    }

    /// Out of sync: drops bytes up to the next `{` (then tried as a candidate frame),
    /// or, after a broken object or array, up to its end, or, after stray bytes, up to
    /// the next newline (then in sync again).
    fn skip_garbage(&mut self, buf: &mut BytesMut) -> Result<Out, ProtocolError> {
        let found = match self.outer.as_mut() {
            None => memchr::memchr2(b'\n', b'{', buf).map(|at| (at, buf[at] == b'\n')),
            Some(outer) => {
                let mut found = None;
                for (at, &byte) in buf.iter().enumerate() {
                    if byte == b'{' {
                        found = Some((at, false));
                        break;
                    }
                    if outer.step(byte) {
                        found = Some((at, true));
                        break;
                    }
                }
                found
            }
        };
        let Some((at, resync)) = found else {
            self.garbage += buf.len();
            buf.clear();
            self.check_garbage()?;
            return Ok(Out::More);
        };
        self.garbage += at;
        self.check_garbage()?;
        if resync {
            buf.advance(at + 1);
            self.in_sync();
        } else {
            buf.advance(at);
            self.scan = Scan {
                kind: Kind::Nested,
                candidate: true,
                ..Scan::default()
            };
        }
        Ok(Out::Again)
    }

    /// Checks an unfinished frame with serde, so that bytes that cannot continue JSON
    /// are answered at once: on every read while the frame is small (typical events),
    /// then each time it has doubled, so that a big frame arriving a byte at a time
    /// still costs linear time.
    fn check_early(&mut self, buf: &mut BytesMut) -> Out {
        if buf.len() > EAGER_CHECK && buf.len() < 2 * self.scan.checked {
            return Out::More;
        }
        if buf.len() == self.scan.checked {
            return Out::More;
        }
        match verdict(buf) {
            Verdict::Invalid(error) => self.fail(buf, error),
            _ => {
                self.scan.checked = buf.len();
                Out::More
            }
        }
    }

    /// The frame at the start of `buf` is not JSON: answer it (unless it was a
    /// candidate after garbage), drop its first byte and resynchronise from there.
    fn fail(&mut self, buf: &mut BytesMut, error: ProtocolError) -> Out {
        let candidate = self.scan.candidate;
        let first = buf.first().copied();
        if candidate {
            // Back to the garbage it came from; its `{` is part of that garbage.
            if let Some(outer) = self.outer.as_mut() {
                outer.step(b'{');
            }
        } else {
            self.garbage = 0;
            // A broken object or array: follow its brackets to its end.
            self.outer = matches!(first, Some(b'{' | b'[')).then(|| Structure {
                depth: 1,
                ..Structure::default()
            });
        }
        buf.advance(1);
        self.garbage += 1;
        self.scan = Scan {
            kind: Kind::Garbage,
            ..Scan::default()
        };
        if candidate {
            Out::Again
        } else {
            Out::Frame(Frame::Rejected(error))
        }
    }

    /// The stream is in sync: the next byte starts a frame.
    fn in_sync(&mut self) {
        self.scan = Scan::default();
        self.garbage = 0;
        self.outer = None;
    }

    /// A whole, typical event at the start of `buf`, validated in one pass; `None`
    /// leaves everything as it was for the reference path.
    fn fast_path(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let window = buf.get(..buf.len().min(self.max_frame + 1))?;
        let parts = fast::event(window).filter(|p| p.end <= self.max_frame)?;
        let line = cut_line(buf, parts.end, false);
        self.in_sync();
        Some(event_frame(Event::from_parts(line, parts)))
    }

    fn check_garbage(&self) -> Result<(), ProtocolError> {
        if self.garbage <= self.max_frame {
            return Ok(());
        }
        Err(ProtocolError::new(
            ErrorCode::InvalidJson,
            format!(
                "more than {} bytes that are not JSON, with no newline or object to resume at; closing the connection",
                self.max_frame
            ),
        ))
    }

    fn check_len(&self, len: usize, code: ErrorCode) -> Result<(), ProtocolError> {
        if len <= self.max_frame {
            return Ok(());
        }
        let message = match code {
            ErrorCode::FrameTooLarge => format!(
                "frame exceeds the {} byte limit; closing the connection",
                self.max_frame
            ),
            _ => format!(
                "a JSON value longer than the {} byte limit; closing the connection",
                self.max_frame
            ),
        };
        Err(ProtocolError::new(code, message))
    }

    /// Finds the end of the string at the start of `buf` (resumable).
    fn scan_string(&mut self, buf: &[u8]) -> Step {
        let s = &mut self.scan;
        let mut i = s.pos.max(1);
        while let Some(rest) = buf.get(i..) {
            if s.escaped {
                let Some(&byte) = rest.first() else { break };
                s.escaped = false;
                if byte == b'\n' {
                    return Step::BrokenString(i);
                }
                i += 1;
                continue;
            }
            let Some(at) = memchr::memchr3(b'"', b'\\', b'\n', rest) else {
                i = buf.len();
                break;
            };
            i += at;
            match rest.get(at) {
                Some(b'"') => return Step::End(i + 1),
                Some(b'\\') => s.escaped = true,
                _ => return Step::BrokenString(i),
            }
            i += 1;
        }
        s.pos = i;
        Step::Incomplete
    }

    fn scan_nested(&mut self, buf: &[u8]) -> Step {
        let s = &mut self.scan;
        let mut i = s.pos;
        // `get` rather than indexing: no panic path on network bytes, by construction.
        while let Some(&byte) = buf.get(i) {
            if s.in_string {
                if s.escaped {
                    s.escaped = false;
                    if byte == b'\n' {
                        return Step::BrokenString(i);
                    }
                    i += 1;
                    continue;
                }
                // Skip plain string bytes in bulk.
                let rest = buf.get(i..).unwrap_or_default();
                let Some(at) = memchr::memchr3(b'"', b'\\', b'\n', rest) else {
                    i = buf.len();
                    break;
                };
                i += at;
                match rest.get(at) {
                    Some(b'"') => s.in_string = false,
                    Some(b'\\') => s.escaped = true,
                    _ => return Step::BrokenString(i),
                }
                i += 1;
                continue;
            }
            match byte {
                b'"' => s.in_string = true,
                b'{' | b'[' => s.depth += 1,
                b'}' | b']' => {
                    s.depth = s.depth.saturating_sub(1);
                    if s.depth == 0 {
                        return Step::End(i + 1);
                    }
                }
                b'\n' | b'\r' => s.multiline = true,
                _ => {}
            }
            i += 1;
        }
        s.pos = i;
        Step::Incomplete
    }
}

fn event_frame(event: Result<Event, ProtocolError>) -> Frame {
    match event {
        Ok(event) => Frame::Event(event),
        Err(err) => Frame::Rejected(err),
    }
}

/// Removes `buf[..end]` and returns it as one `\n`-terminated line.
///
/// Always a copy in an allocation of its own, never a slice of `buf`: a slice keeps
/// the whole read buffer alive for as long as any receiver's queue holds the line,
/// and queues are bounded by what they hold (issue #10). The copy is one `memcpy`,
/// and it leaves `buf` unshared, so its space is reused for the next read instead of
/// a new buffer being allocated (docs/performance.md has the measurement).
fn cut_line(buf: &mut BytesMut, end: usize, multiline: bool) -> Bytes {
    if multiline {
        let line = compact(&buf[..end]);
        buf.advance(end);
        return line;
    }
    let mut line = BytesMut::with_capacity(end + 1);
    line.put_slice(&buf[..end]);
    line.put_u8(b'\n');
    let newline = usize::from(buf.get(end) == Some(&b'\n'));
    buf.advance(end + newline);
    line.freeze()
}

/// Drops the whitespace outside strings, so a pretty-printed object fits on one line.
fn compact(frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(frame.len() + 1);
    let (mut in_string, mut escaped) = (false, false);
    for &b in frame {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_ws(b) {
            continue;
        }
        out.put_u8(b);
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Bytes that can be part of a number or a literal (`true`, `false`, `null`).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// Whether `text` ends in a token that more bytes could turn into a JSON number or
/// literal, after a part that is valid so far.
fn unfinished_token(text: &str) -> bool {
    let bytes = text.as_bytes();
    let tail = bytes
        .iter()
        .rposition(|&b| !is_token_byte(b))
        .map_or(0, |at| at + 1);
    let (before, token) = bytes.split_at(tail);
    if token.is_empty() {
        return false;
    }
    let before_ok = before.iter().all(|&b| is_ws(b))
        || matches!(
            serde_json::from_slice::<serde::de::IgnoredAny>(before),
            Err(e) if e.is_eof()
        );
    before_ok && (literal_prefix(token) || number_prefix(token))
}

fn literal_prefix(token: &[u8]) -> bool {
    [&b"true"[..], b"false", b"null"]
        .iter()
        .any(|literal| literal.starts_with(token))
}

/// Whether `token` is the start of a JSON number (RFC 8259's grammar, cut anywhere).
fn number_prefix(token: &[u8]) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum At {
        Start,
        Minus,
        Zero,
        Int,
        Dot,
        Frac,
        E,
        ESign,
        Exp,
    }
    let mut at = At::Start;
    for &b in token {
        at = match (at, b) {
            (At::Start, b'-') => At::Minus,
            (At::Start | At::Minus, b'0') => At::Zero,
            (At::Start | At::Minus, b'1'..=b'9') => At::Int,
            (At::Int, b'0'..=b'9') => At::Int,
            (At::Zero | At::Int, b'.') => At::Dot,
            (At::Dot | At::Frac, b'0'..=b'9') => At::Frac,
            (At::Zero | At::Int | At::Frac, b'e' | b'E') => At::E,
            (At::E, b'+' | b'-') => At::ESign,
            (At::E | At::ESign | At::Exp, b'0'..=b'9') => At::Exp,
            _ => return false,
        };
    }
    true
}

/// Errors in the bytes themselves (the stream is out of sync), as opposed to valid
/// JSON of the wrong shape.
fn is_syntax(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::InvalidJson | ErrorCode::InvalidUtf8)
}

/// What serde says of `bytes` as the start (or the whole) of one JSON value. The first
/// problem by position wins, so a frame gets the same answer however it was split.
fn verdict(bytes: &[u8]) -> Verdict {
    let (text, bad_utf8) = match std::str::from_utf8(bytes) {
        Ok(text) => (text, None),
        Err(e) => (
            std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
            Some(e),
        ),
    };
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) if bad_utf8.is_none() => Verdict::Valid,
        // serde reports some numbers cut off by the end as errors (`-`, `1e`): if the
        // last token could still grow into a number or literal, and what comes before
        // it is merely unfinished, the value is not wrong yet.
        Err(e) if !e.is_eof() && bad_utf8.is_none() && unfinished_token(text) => {
            Verdict::Incomplete
        }
        Err(e) if !e.is_eof() => {
            Verdict::Invalid(ProtocolError::new(ErrorCode::InvalidJson, e.to_string()))
        }
        // A character cut off at the end of what has arrived: more may finish it.
        _ if bad_utf8.is_some_and(|e| e.error_len().is_none()) => Verdict::Incomplete,
        _ => match bad_utf8 {
            Some(e) => Verdict::Invalid(crate::event::utf8_at(e.valid_up_to())),
            None => Verdict::Incomplete,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one at a time and collects every frame (or the fatal error).
    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<Result<String, ErrorCode>>, Option<ErrorCode>) {
        let mut decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(Frame::Event(e))) => {
                        out.push(Ok(String::from_utf8(e.line().to_vec()).unwrap()))
                    }
                    Ok(Some(Frame::Rejected(err))) => out.push(Err(err.code)),
                    Ok(None) => break,
                    Err(err) => return (out, Some(err.code)),
                }
            }
            assert!(buf.len() <= max + chunk.len(), "buffer grew past the limit");
        }
        (out, None)
    }

    const THREE: &[u8] =
        br#"{"event":"a","payload":{"s":"x}\"{"}}{"event":"b","payload":[1,{"c":2}]}
{"event":"c","payload":null}"#;

    #[test]
    fn every_split_yields_the_same_events() {
        let (whole, _) = run(1024, &[THREE]);
        assert_eq!(whole.len(), 3);
        for cut in 0..=THREE.len() {
            let (split, fatal) = run(1024, &[&THREE[..cut], &THREE[cut..]]);
            assert_eq!(split, whole, "split at {cut}");
            assert_eq!(fatal, None);
        }
        let bytes: Vec<&[u8]> = THREE.chunks(1).collect();
        assert_eq!(run(1024, &bytes).0, whole);
    }

    #[test]
    fn whitespace_crlf_and_pretty_printing() {
        let input = b" \t{\"event\":\"a\",\"payload\":1}\r\n\r\n{\n  \"event\": \"b\",\n  \"payload\": { \"k\": \"v w\" }\n}\n";
        let (out, fatal) = run(1024, &[input]);
        assert_eq!(fatal, None);
        assert_eq!(
            out,
            vec![
                Ok("{\"event\":\"a\",\"payload\":1}\n".to_string()),
                Ok("{\"event\":\"b\",\"payload\":{\"k\":\"v w\"}}\n".to_string()),
            ]
        );
    }

    /// Issue #10: a frame handed out never shares the read buffer's allocation (a
    /// queued slice would keep all of it alive), and the buffer stays reusable.
    /// Stretches of equal names are counted exactly: short names (one masked load),
    /// long ones, names that share a prefix, a name that is a prefix of the next, and
    /// names whose bytes differ only past their end.
    #[test]
    fn name_stretches_count_each_stretch_of_equal_names() {
        let names = [
            "a",
            "a",
            "ab",
            "ab",
            "ab",
            "a",
            "abcdefgh",
            "abcdefgh",
            "abcdefgi",
            "a-long-name-1",
            "a-long-name-1",
            "a-long-name-2",
            "é",
            "é",
        ];
        let mut input = String::new();
        for name in names {
            input.push_str(&format!("{{\"event\":\"{name}\",\"payload\":1}}\n"));
        }
        let mut decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(input.as_bytes());
        let mut run = Run::default();
        assert!(decoder.decode_run(&mut buf, &mut run));
        assert_eq!(run.len(), names.len());
        let mut seen = Vec::new();
        run.name_stretches(|name, count| seen.push((name.to_string(), count)));
        let expected = [
            ("a", 2),
            ("ab", 3),
            ("a", 1),
            ("abcdefgh", 2),
            ("abcdefgi", 1),
            ("a-long-name-1", 2),
            ("a-long-name-2", 1),
            ("é", 2),
        ];
        assert_eq!(
            seen,
            expected.map(|(n, c)| (n.to_string(), c as u64)).to_vec()
        );
    }

    #[test]
    fn frames_never_pin_the_read_buffer() {
        let mut decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(
            b"{\"event\":\"a\",\"payload\":1}\n{\"event\":\"$p\",\"payload\":1}\n",
        );
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + 4096;
        let mut run = Run::default();
        assert!(decoder.decode_run(&mut buf, &mut run));
        assert!(!range.contains(&(run.bytes().as_ptr() as usize)));
        assert!(!range.contains(&(run.line(0).as_ptr() as usize)));
        let Some(Frame::Event(e)) = decoder.decode(&mut buf).unwrap() else {
            panic!("no event")
        };
        assert!(!range.contains(&(e.line().as_ptr() as usize)));
        assert_eq!(e.line().len(), e.line().as_ref().len());
        // Nothing else holds the buffer: reserving reuses its space in place.
        assert!(buf.is_empty());
        buf.reserve(4000);
        assert!(range.contains(&(buf.as_ptr() as usize)));
    }

    #[test]
    fn garbage_resynchronises_at_newline() {
        let (out, fatal) = run(
            1024,
            &[b"hello world\n[1,2]\"str\"\n42\n{\"event\":\"x\n{\"event\":\"ok\",\"payload\":0}\n"],
        );
        assert_eq!(fatal, None);
        assert_eq!(
            out,
            vec![
                Err(ErrorCode::InvalidJson),
                Err(ErrorCode::NotAnEvent),
                Err(ErrorCode::NotAnEvent), // `"str"`: valid JSON, taken up to the newline
                Err(ErrorCode::NotAnEvent), // `42`
                Err(ErrorCode::InvalidJson),
                Ok("{\"event\":\"ok\",\"payload\":0}\n".to_string()),
            ]
        );
    }

    #[test]
    fn oversized_frame_is_fatal_before_it_is_complete() {
        let mut big = b"{\"event\":\"a\",\"payload\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 200));
        let (out, fatal) = run(100, &[&big[..50], &big[50..]]);
        assert!(out.is_empty());
        assert_eq!(fatal, Some(ErrorCode::FrameTooLarge));
        // A frame of exactly the limit is fine.
        let exact = br#"{"event":"a","payload":1}"#;
        let (out, fatal) = run(exact.len(), &[exact]);
        assert_eq!((out.len(), fatal), (1, None));
        let (_, fatal) = run(exact.len() - 1, &[exact]);
        assert_eq!(fatal, Some(ErrorCode::FrameTooLarge));
    }

    #[test]
    fn endless_garbage_is_fatal() {
        let (_, fatal) = run(64, &[&[b'x'; 100]]);
        assert_eq!(fatal, Some(ErrorCode::InvalidJson));
    }

    #[test]
    fn invalid_utf8_and_reserved_names() {
        let (out, _) = run(
            1024,
            &[b"{\"event\":\"a\",\"payload\":\"\xc3\x28\"}\n\xff\n"],
        );
        assert_eq!(
            out,
            vec![Err(ErrorCode::InvalidUtf8), Err(ErrorCode::InvalidUtf8)]
        );
        let (out, _) = run(1024, &[br#"{"event":"$x","payload":1}"#]);
        assert!(matches!(&out[..], [Ok(line)] if line.contains("$x")));
    }

    #[test]
    fn partial_frame_is_reported_at_end_of_stream() {
        let mut decoder = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&b"{\"event\":"[..]);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        assert!(decoder.has_partial(&buf));
        let mut buf = BytesMut::from(&b"  \r\n"[..]);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        assert!(!decoder.has_partial(&buf));
    }
}
