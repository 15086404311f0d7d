//! Giving memory back after a burst. mimalloc keeps freed memory in per-thread caches
//! for reuse; once the hub's pool is empty, each runtime worker asks it to return that
//! memory to the system the next time it has nothing to do (tokio's park hook).
//!
//! And keeping it in small pages: see [`small_pages_only`].

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

/// Keeps this process's memory in 4 KiB pages, unless `MIMALLOC_ALLOW_THP` is set (then
/// mimalloc does as it says).
///
/// mimalloc asks the kernel for transparent huge pages, and where the kernel has 2 MiB
/// blocks free, every first touch of such a block zeroes all of it. On this project's
/// machines that made the same run of `hubcast bench` a fifth slower or not at random
/// (the bench's kernel time 0.55–0.62 s against 0.30–0.35 s, with fewer page faults),
/// and cost the hub ~10% more CPU on TLS fan-out to 100 subscribers (390–430 ms
/// against 360–410 ms per 10 M deliveries; plaintext unchanged): docs/performance.md.
/// A hub's memory is many small buffers, not a large heap whose page tables matter, and
/// Redis warns against transparent huge pages for the same kind of process.
pub fn small_pages_only() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` reads no memory; it sets a flag
    // of this process, which the kernel checks when it maps a page (and, since Linux
    // 4.13, for what is already mapped).
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_gives_up_transparent_huge_pages() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return; // the operator's choice wins, by design
        }
        super::small_pages_only();
        // SAFETY: `PR_GET_THP_DISABLE` only reads this process's flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
