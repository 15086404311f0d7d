//! Differential fuzzing of the decoder's fast path: on any bytes, in any split, the
//! decoder must give exactly the frames and errors of the reference path (the
//! structural scanner and serde_json), which never takes the fast path.
#![no_main]

use bytes::BytesMut;
use hubcast::frame::{Frame, FrameDecoder, Run};
use libfuzzer_sys::fuzz_target;

const MAX_FRAME: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let fast = frames(FrameDecoder::new(MAX_FRAME), data, chunk);
    let reference = frames(FrameDecoder::reference(MAX_FRAME), data, chunk);
    assert_eq!(fast, reference);
});

fn frames(mut decoder: FrameDecoder, data: &[u8], chunk: usize) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut run = Run::default();
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        let room = decoder.read_limit(&buf);
        buf.extend_from_slice(&piece[..piece.len().min(room)]);
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
                Ok(Some(Frame::Rejected(e))) => out.push(format!("rejected {} {}", e.code, e.message)),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("fatal {} {}", e.code, e.message));
                    return out;
                }
            }
        }
    }
    out
}
