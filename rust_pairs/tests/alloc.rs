//! Its own test binary: builds in other tests' threads would hold the setting meanwhile.

use rust_pairs::alloc::{purge_delay, RetainFreed};

#[test]
fn holds_keep_freed_memory_mapped_and_restore_the_setting() {
    let before = purge_delay();
    assert_ne!(before, -1, "mimalloc's default purges freed memory");
    let a = RetainFreed::new();
    assert_eq!(purge_delay(), -1);
    let b = RetainFreed::new();
    drop(a);
    assert_eq!(purge_delay(), -1, "a build still runs");
    drop(b);
    assert_eq!(purge_delay(), before);
}
