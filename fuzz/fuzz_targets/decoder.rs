//! Fuzzes the frame decoder: any bytes, delivered in any split, must give events or
//! rejections, never a panic or a hang, and never buffer past the frame limit.
#![no_main]

use bytes::BytesMut;
use hubcast::frame::{Frame, FrameDecoder};
use hubcast::Event;
use libfuzzer_sys::fuzz_target;

/// Small, so the fuzzer reaches the limit paths often.
const MAX_FRAME: usize = 512;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size: the same bytes arrive in pieces.
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    'feed: for piece in data.chunks(chunk) {
        // As the connection does: never read more than the decoder has room for.
        let room = decoder.read_limit(&buf);
        buf.extend_from_slice(&piece[..piece.len().min(room)]);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Event(event))) => check(&event),
                Ok(Some(Frame::Rejected(_))) => {}
                Ok(None) => break,
                Err(_) => break 'feed, // fatal: the connection would close
            }
        }
        assert!(buf.len() <= MAX_FRAME + 1, "buffered {} bytes", buf.len());
    }
});

/// An event is one line that parses back to itself.
fn check(event: &Event) {
    let line = event.line();
    assert_eq!(line.last(), Some(&b'\n'));
    assert!(!line[..line.len() - 1].contains(&b'\n'), "a raw newline inside a line");
    let again = Event::from_line(line.clone()).expect("a forwarded line must parse again");
    assert_eq!(again.name(), event.name());
    assert_eq!(again.payload(), event.payload());
}
