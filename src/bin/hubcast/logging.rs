//! Where the binary's log lines go: standard error, through a bounded queue drained by
//! a thread of its own, so that a slow or broken log destination never blocks or
//! kills a task (issue #11).
//!
//! tracing-subscriber formats each event into a buffer and hands it to a writer. A
//! blocking write to a pipe nobody reads stalls whichever task logged, and a failed
//! one was reported with `eprintln!`, which panics on `EPIPE` (after `hubcast serve
//! 2>&1 | head -2`, every task that logged died, the signal handler too, and the hub
//! kept its port). Here a line is queued with `try_send`: when the queue is full the
//! line is dropped and counted, and the writer thread says how many it skipped once
//! it can write again. When standard error is gone for good, lines are dropped.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the writer thread; past this, lines are skipped (and counted).
const QUEUE: usize = 4096;
/// Most bytes written to stderr at once.
const BATCH_BYTES: usize = 64 * 1024;
/// How long the writer waits after a write before it looks at the queue again.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A `MakeWriter` that queues each formatted line for the writer thread.
#[derive(Clone)]
pub struct LogQueue {
    lines: SyncSender<Vec<u8>>,
    skipped: Arc<AtomicU64>,
    progress: Arc<Progress>,
}

/// Lines queued and lines the writer thread is done with (written or dropped), so
/// that the process can wait for its last lines before it exits.
#[derive(Default)]
struct Progress {
    queued: AtomicU64,
    done: AtomicU64,
}

/// The queue of the process's log (set by `LogQueue::to_stderr`).
static PROGRESS: std::sync::OnceLock<Arc<Progress>> = std::sync::OnceLock::new();

/// Waits (at most `limit`) until every line queued so far has been written: called
/// before the process exits, so that its last lines (the totals) are not lost.
pub fn flush(limit: std::time::Duration) {
    let Some(progress) = PROGRESS.get() else {
        return;
    };
    let target = progress.queued.load(Ordering::Acquire);
    let deadline = std::time::Instant::now() + limit;
    while progress.done.load(Ordering::Acquire) < target && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl LogQueue {
    /// Starts the writer thread, writing to standard error.
    pub fn to_stderr() -> LogQueue {
        let (lines, queue) = sync_channel::<Vec<u8>>(QUEUE);
        let skipped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&skipped);
        let progress = Arc::new(Progress::default());
        let _ = PROGRESS.set(Arc::clone(&progress));
        let written = Arc::clone(&progress);
        let spawned = std::thread::Builder::new()
            .name("hubcast-log".into())
            .spawn(move || {
                let mut stderr = std::io::stderr();
                let mut broken = false;
                let mut batch = Vec::with_capacity(BATCH_BYTES);
                while let Ok(first) = queue.recv() {
                    // Whatever else is waiting goes out in the same write.
                    let mut lines = 1;
                    batch.extend_from_slice(&first);
                    while batch.len() < BATCH_BYTES {
                        let Ok(line) = queue.try_recv() else { break };
                        batch.extend_from_slice(&line);
                        lines += 1;
                    }
                    if !broken {
                        let missed = counter.swap(0, Ordering::Relaxed);
                        if missed > 0 {
                            let note = format!(
                                "... {missed} log lines skipped (the log could not keep up)\n"
                            );
                            broken = stderr.write_all(note.as_bytes()).is_err();
                        }
                        broken = broken || stderr.write_all(&batch).is_err();
                    }
                    batch.clear();
                    written.done.fetch_add(lines, Ordering::Release);
                    // Lines sent meanwhile wait in the queue and cost their senders no
                    // wake-up: under a burst (thousands of connects a second, three
                    // lines each) the thread wakes a few hundred times a second, not
                    // once a line.
                    std::thread::sleep(LINGER);
                }
            });
        if spawned.is_err() {
            // No thread, no log: the queue's receiver is gone and every line is
            // dropped, which is still better than blocking.
        }
        LogQueue {
            lines,
            skipped,
            progress,
        }
    }
}

/// One line on its way to the queue.
pub struct QueuedLine {
    line: Vec<u8>,
    queue: LogQueue,
}

impl Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        match self.queue.lines.try_send(std::mem::take(&mut self.line)) {
            Ok(()) => {
                self.queue.progress.queued.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_)) => {
                self.queue.skipped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine;

    fn make_writer(&'a self) -> QueuedLine {
        QueuedLine {
            line: Vec::new(),
            queue: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (lines, queue) = sync_channel(2);
        let log = LogQueue {
            lines,
            skipped: Arc::new(AtomicU64::new(0)),
            progress: Arc::default(),
        };
        for n in 0..5 {
            let mut line = log.make_writer();
            writeln!(line, "line {n}").unwrap();
        }
        assert_eq!(log.skipped.load(Ordering::Relaxed), 3);
        assert_eq!(queue.try_recv().unwrap(), b"line 0\n");
        drop(queue);
        // The reader gone: lines vanish without an error or a panic.
        writeln!(log.make_writer(), "late").unwrap();
    }
}
