//! Allocator settings for the length of a build.
//!
//! The extension's global allocator is mimalloc (see `python`). By default mimalloc hands freed
//! memory back to the OS 10 ms after it is freed; a build frees and reallocates tens of MB per
//! spill bucket and per batch, so every reuse then costs a page fault and a zeroed page. On the
//! 100k-row Parquet build of benchmarks/parquet_build.py (release) this took page faults from
//! 10,000 to 2,500 and best CPU time from 3.28 to 3.01 s (7 interleaved runs each, a few percent
//! of wall time; peak RSS up to 212 MB from 188). While a build runs, freed memory stays mapped
//! (it is reused by the build, whose peak is bounded by the spill budget); when the last build
//! ends, the previous setting comes back and the retained memory is returned.

use libmimalloc_sys::{mi_collect, mi_option_get, mi_option_set, mi_option_t};
use std::sync::Mutex;

/// `mi_option_purge_delay`: index 15 of `mi_option_t` in both mimalloc v2's and v3's `mimalloc.h`
/// (libmimalloc-sys does not export the constant for v3). -1 means "never purge".
const PURGE_DELAY: mi_option_t = 15;

/// Builds running, and the purge delay to restore when the last one ends.
static ACTIVE: Mutex<(usize, i64)> = Mutex::new((0, 0));

/// Keeps freed memory mapped while it lives (nested and concurrent holds are counted).
pub struct RetainFreed(());

impl RetainFreed {
    pub fn new() -> Self {
        let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        if active.0 == 0 {
            // SAFETY: reading and setting a mimalloc option are thread-safe calls with no pointers.
            active.1 = unsafe { mi_option_get(PURGE_DELAY) } as i64;
            unsafe { mi_option_set(PURGE_DELAY, -1) };
        }
        active.0 += 1;
        RetainFreed(())
    }
}

impl Default for RetainFreed {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RetainFreed {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        active.0 -= 1;
        if active.0 == 0 {
            // SAFETY: as above; mi_collect(true) frees what mimalloc holds unused, from any thread.
            unsafe {
                mi_option_set(PURGE_DELAY, active.1 as _);
                mi_collect(true);
            }
        }
    }
}

/// The purge delay now in effect (for tests).
pub fn purge_delay() -> i64 {
    // SAFETY: as above.
    unsafe { mi_option_get(PURGE_DELAY) as i64 }
}
