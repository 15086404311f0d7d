//! Property tests of the frame decoder (issue #5): splits, garbage, round trips.

use bytes::BytesMut;
use hubcast::frame::{Frame, FrameDecoder, Run};
use hubcast::Event;
use proptest::prelude::*;
use serde_json::Value;

/// Decodes `chunks` in order; returns each frame as `Ok(line)` or `Err(code)`, and the
/// fatal error if the stream ended in one.
fn decode(max: usize, chunks: &[&[u8]]) -> (Vec<Result<Vec<u8>, String>>, Option<String>) {
    let mut decoder = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let room = decoder.read_limit(&buf);
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Event(e))) => out.push(Ok(e.line().to_vec())),
                Ok(Some(Frame::Rejected(e))) => out.push(Err(e.code.to_string())),
                Ok(None) => break,
                Err(e) => return (out, Some(e.code.to_string())),
            }
        }
        assert!(
            buf.len() <= max + 1,
            "buffered {} bytes past a {max} limit",
            buf.len()
        );
    }
    (out, None)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[ -~é\\n\"\\\\{}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z{}\"]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_name() -> impl Strategy<Value = String> {
    "[a-zé-][a-z0-9é-]{0,8}(\\.[a-z*>]{1,5}){0,2}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any split of a valid stream, with any separators, decodes to the same events.
    #[test]
    fn any_split_decodes_to_the_same_events(
        events in prop::collection::vec((event_name(), json_value()), 1..6),
        separators in prop::collection::vec(prop::sample::select(vec!["", "\n", "\r\n", " \t", "\n\n"]), 6),
        pretty in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = Vec::new();
        for (i, (name, payload)) in events.iter().enumerate() {
            let object = serde_json::json!({"event": name, "payload": payload});
            let text = if pretty { serde_json::to_string_pretty(&object) } else { serde_json::to_string(&object) };
            stream.extend_from_slice(text.unwrap().as_bytes());
            stream.extend_from_slice(separators[i].as_bytes());
        }
        let (whole, fatal) = decode(1 << 20, &[&stream]);
        prop_assert_eq!(fatal, None);
        prop_assert_eq!(whole.len(), events.len());
        for (line, (name, payload)) in whole.iter().zip(&events) {
            let line = line.as_ref().expect("a valid event was rejected");
            let parsed: Value = serde_json::from_slice(line).unwrap();
            prop_assert_eq!(&parsed["event"], &Value::from(name.as_str()));
            prop_assert_eq!(&parsed["payload"], payload);
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for point in points {
            chunks.push(&stream[from..point]);
            from = point;
        }
        chunks.push(&stream[from..]);
        let (split, fatal) = decode(1 << 20, &chunks);
        prop_assert_eq!(fatal, None);
        prop_assert_eq!(split, whole);
    }

    /// Any bytes, in any chunks, give events or errors: never a panic, never more
    /// buffered than the limit, and every event line parses back.
    #[test]
    fn any_bytes_give_events_or_errors(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        chunk in 1usize..64,
    ) {
        let chunks: Vec<&[u8]> = bytes.chunks(chunk).collect();
        let (frames, _) = decode(256, &chunks);
        for frame in frames.into_iter().flatten() {
            prop_assert_eq!(frame.last(), Some(&b'\n'));
            prop_assert!(Event::from_line(frame.into()).is_ok());
        }
    }

    /// Garbage built from JSON's own characters (more likely to get far) is handled too.
    #[test]
    fn json_like_garbage_gives_events_or_errors(
        text in "[{}\\[\\]\":,\\\\ \\nae0-9$]{0,400}",
        chunk in 1usize..32,
    ) {
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(chunk).collect();
        let (frames, _) = decode(128, &chunks);
        for frame in frames.into_iter().flatten() {
            prop_assert!(Event::from_line(frame.into()).is_ok());
        }
    }

    /// Encoding an event and decoding its line gives the same name and payload.
    #[test]
    fn encode_then_decode_is_identity(name in event_name(), payload in json_value()) {
        let event = Event::new(&name, &payload).unwrap();
        let (frames, fatal) = decode(1 << 20, &[event.line()]);
        prop_assert_eq!(fatal, None);
        prop_assert_eq!(frames.len(), 1);
        let line = frames[0].clone().unwrap();
        prop_assert_eq!(&line[..], &event.line()[..]);
        let again = Event::from_line(line.into()).unwrap();
        prop_assert_eq!(again.name().as_str(), name.as_str());
        let decoded: Value = serde_json::from_str(again.payload()).unwrap();
        prop_assert_eq!(decoded, payload);
    }
}

/// Every frame as the fast path and the reference path see it: events by line, name,
/// payload and room; rejections by code and message; then the fatal error, if any.
fn frames(mut decoder: FrameDecoder, chunks: &[&[u8]]) -> Vec<String> {
    let max = decoder.max_frame();
    let mut buf = BytesMut::new();
    let mut run = Run::default();
    let mut out = Vec::new();
    for chunk in chunks {
        let room = decoder.read_limit(&buf);
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        loop {
            // As a connection does: runs of plain events first, then frame by frame.
            if decoder.decode_run(&mut buf, &mut run) {
                for index in 0..run.len() {
                    let e = run.event(index);
                    assert_eq!(run.name(index), e.name().as_str());
                    out.push(format!(
                        "event {:?} {:?} {:?} {:?} {:?}",
                        e.line(),
                        e.name(),
                        e.payload(),
                        e.room(),
                        e.id()
                    ));
                }
                continue;
            }
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Event(e))) => out.push(format!(
                    "event {:?} {:?} {:?} {:?} {:?}",
                    e.line(),
                    e.name(),
                    e.payload(),
                    e.room(),
                    e.id()
                )),
                Ok(Some(Frame::Rejected(e))) => {
                    out.push(format!("rejected {} {}", e.code, e.message))
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("fatal {} {}", e.code, e.message));
                    return out;
                }
            }
        }
        assert!(buf.len() <= max + 1);
    }
    out
}

/// Pieces of JSON, good and bad, that the fast path must either take exactly as the
/// reference path does, or leave to it.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        json_value().prop_map(|v| v.to_string()),
        event_name().prop_map(|n| format!(r#"{{"event":"{n}","payload":1}}"#)),
        Just(r#"{"event":"a","payload":{"x":[1,2.5e3,-0,true,null]},"room":"r"}"#.to_string()),
        Just(r#"{"event":"a","payload":1,"id":"order-7"}"#.to_string()),
        Just(r#"{"id":"\u00e9t\u00e9","event":"b","payload":[]}"#.to_string()),
        Just(r#"{"event":"c","payload":null,"id":42}"#.to_string()),
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            "\\u00e9",
            "\\ud800",
            "\\n",
            " ",
            "\t",
            "\n",
            "\r",
            "0",
            "01",
            "-",
            "1.",
            "1e",
            "1e+5",
            "tru",
            "true",
            "null",
            "é",
            "\u{1}",
            r#""event""#,
            r#""payload""#,
            r#""room""#,
            r#""event":"#,
            r#""payload":"#,
            r#""room":"#,
            r#""id":"#,
            r#""id":"x""#,
            r#"{"event":"#,
            r#"{"payload":"#,
            r#""x","#,
            "\"\"",
        ])
        .prop_map(str::to_string),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The fast path is an optimisation only: on any input, in any split, the decoder
    /// gives exactly the frames (and errors, word for word) that the reference gives.
    #[test]
    fn the_fast_path_agrees_with_the_reference(
        pieces in prop::collection::vec(fragment(), 1..24),
        bad_byte in prop::option::of((any::<prop::sample::Index>(), 0x80u8..=0xff)),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        max in prop::sample::select(vec![24usize, 64, 1 << 20]),
    ) {
        let mut stream = pieces.concat().into_bytes();
        if let (Some((at, byte)), false) = (bad_byte, stream.is_empty()) {
            let at = at.index(stream.len());
            stream[at] = byte;
        }
        let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        offsets.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for offset in offsets.into_iter().chain([stream.len()]) {
            chunks.push(&stream[last..offset]);
            last = offset;
        }
        prop_assert_eq!(
            frames(FrameDecoder::new(max), &chunks),
            frames(FrameDecoder::reference(max), &chunks)
        );
    }
}

/// Splits `stream` at the given cut points.
fn split_at<'a>(stream: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for point in points.into_iter().chain([stream.len()]) {
        chunks.push(&stream[from..point]);
        from = point;
    }
    chunks
}

/// Garbage a client might write before its events: stray words, scalars, broken or
/// unfinished JSON, random bytes.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "hello",
            "\"hi\"",
            "42",
            "-",
            "tru",
            "true",
            "null",
            "{",
            "[",
            "\"",
            "{\"a\":",
            "{\"a\":[",
            "{oops",
            "}",
            "]",
            ",",
            "\\",
            "\"\\",
            "{{{{",
            "[1 2 3]",
            "1e400",
            "\u{feff}",
            "{\"event\":\"x\"",
            "{\"event\":\"a\",oops}",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        "[{}\\[\\]\":,\\\\ ae0-9tfnul.-]{1,40}".prop_map(|s| s.into_bytes()),
        prop::collection::vec(any::<u8>(), 1..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Issue #10 (8): garbage of any kind followed by events, with or without newlines,
    /// split anywhere: the garbage is answered with at least one `$error` and the
    /// decoder resynchronises: every event after the resync point is delivered (at
    /// most the first can be swallowed, by garbage such as an open string). At least
    /// two events: garbage such as `[` followed by one event is still valid JSON so
    /// far, and no decoder can tell before the next byte.
    #[test]
    fn garbage_then_events_resynchronise(
        garbage in garbage(),
        names in prop::collection::vec(event_name(), 2..5),
        newlines in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        // Skip garbage that is itself a valid event stream (nothing to resync from).
        prop_assume!(!garbage.iter().all(u8::is_ascii_whitespace));
        let events: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!(r#"{{"event":"{n}","payload":{i}}}"#))
            .collect();
        let mut stream = garbage.clone();
        for event in &events {
            stream.extend_from_slice(event.as_bytes());
            if newlines {
                stream.push(b'\n');
            }
        }
        let (whole, fatal) = decode(1 << 20, &[&stream]);
        prop_assert_eq!(fatal, None);
        let delivered: Vec<String> = whole
            .iter()
            .filter_map(|f| f.as_ref().ok())
            .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
            .filter(|l| events.contains(l))
            .collect();
        let errors = whole.iter().filter(|f| f.is_err()).count();
        let bom = garbage == "\u{feff}".as_bytes();
        if !bom {
            prop_assert!(errors >= 1, "no $error for {:?}", String::from_utf8_lossy(&garbage));
        }
        prop_assert!(delivered.len() + 1 >= events.len(), "{:?} -> {:?}", String::from_utf8_lossy(&stream), whole);
        prop_assert_eq!(&delivered[..], &events[events.len() - delivered.len()..]);
        let (split, fatal) = decode(1 << 20, &split_at(&stream, &cuts));
        prop_assert_eq!(fatal, None);
        prop_assert_eq!(split, whole);
    }

    /// Issue #10 (4): a frame with raw line breaks (pretty-printed, or broken) is judged
    /// exactly as serde judges the same text: accepted with the same name and payload
    /// when it is a valid event, never accepted (and changed) when it is not JSON.
    #[test]
    fn multiline_frames_are_judged_as_serde_judges_them(
        pieces in prop::collection::vec(fragment(), 1..12),
        breaks in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut text = String::from("{\"event\":\"e\",\"payload\":");
        text.push_str(&pieces.concat());
        text.push('}');
        let mut bytes = text.into_bytes();
        for at in &breaks {
            let at = at.index(bytes.len() - 1) + 1;
            bytes.insert(at, b'\n');
        }
        let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
        // The decoder frames the first value; what follows is another matter.
        let Some(verdict) = serde_json::Deserializer::from_str(&text).into_iter::<Value>().next() else {
            return Ok(());
        };
        let (frames, _) = decode(1 << 20, &split_at(text.as_bytes(), &cuts));
        match verdict {
            Ok(Value::Object(object)) if object.get("event").is_some_and(Value::is_string)
                && object.contains_key("payload")
                && object.get("room").is_none_or(|r| r.is_string()) => {
                let first = frames.first().expect("no frame").as_ref().expect("a valid event was rejected");
                let line: Value = serde_json::from_slice(first).unwrap();
                prop_assert_eq!(&line["event"], &object["event"]);
                prop_assert_eq!(&line["payload"], &object["payload"]);
            }
            Ok(_) => {}
            // Unfinished (an open string, say): valid so far, nothing to judge yet.
            Err(e) if e.is_eof() => {}
            Err(_) => {
                let first = frames.first().expect("no frame");
                prop_assert!(first.is_err(), "invalid JSON {:?} was accepted as {:?}", text, first);
            }
        }
    }
}

/// A pattern of up to 6 segments from a small alphabet, so that literals, `*` and `>`
/// collide often.
fn small_pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "*", ">"]), 1..6)
        .prop_map(|segments| segments.join("."))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Issue #10 (2): the router (a compact trie plus an exact-name map) matches
    /// exactly what a scan of every subscription would, through inserts and removals.
    /// (`fuzz/fuzz_targets/routing.rs` runs the same model under libFuzzer.)
    #[test]
    fn the_router_agrees_with_a_naive_model(
        ops in prop::collection::vec((0u8..3, 0u8..8, small_pattern()), 1..80),
        names in prop::collection::vec(prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..7), 1..10),
    ) {
        use hubcast::routing::{Pattern, Router};
        let mut router = Router::default();
        let mut model = std::collections::BTreeSet::new();
        for (kind, key, text) in ops {
            let Ok(pattern) = Pattern::parse(&text) else { continue };
            if kind < 2 {
                prop_assert_eq!(router.insert(&pattern, key), model.insert((text, key)));
            } else {
                prop_assert_eq!(router.remove(&pattern, key), model.remove(&(text, key)));
            }
            prop_assert_eq!(router.len(), model.len());
        }
        for name in names {
            let name = name.join(".");
            let mut got = Vec::new();
            router.matches(&name, &mut got);
            got.sort_unstable();
            let want: std::collections::BTreeSet<u8> = model
                .iter()
                .filter(|(p, _)| Pattern::parse(p).unwrap().matches(&name))
                .map(|&(_, k)| k)
                .collect();
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{}", name);
        }
    }
}
