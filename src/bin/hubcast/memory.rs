//! Giving memory back after a burst. mimalloc keeps freed memory in per-thread caches
//! for reuse; once the hub's pool is empty, each runtime worker asks it to return that
//! memory to the system the next time it has nothing to do (tokio's park hook).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bumped to ask every worker for one collection.
static REQUESTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last request this thread honoured.
    static DONE: Cell<u64> = const { Cell::new(0) };
}

/// For `runtime::Builder::on_thread_park`: collect if asked since this thread last did.
pub fn on_park() {
    let requested = REQUESTED.load(Ordering::Relaxed);
    DONE.with(|done| {
        if done.get() != requested {
            done.set(requested);
            // SAFETY: `mi_collect` asks mimalloc, the global allocator, to free this
            // thread's cached memory; it may be called from any thread at any time.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    });
}

/// Asks for a collection each time the pool empties (after closing connections have had
/// a moment to free their buffers).
pub async fn collect_when_idle(mut clients: tokio::sync::watch::Receiver<usize>) {
    loop {
        if clients.wait_for(|&n| n > 0).await.is_err()
            || clients.wait_for(|&n| n == 0).await.is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if *clients.borrow() == 0 {
            REQUESTED.fetch_add(1, Ordering::Relaxed);
            // Idle workers are parked already: give each a moment of work, so that it
            // parks again and collects.
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            for _ in 0..workers * 4 {
                tokio::spawn(tokio::task::yield_now());
            }
            tracing::debug!("pool empty: workers return cached memory as they park");
        }
    }
}
