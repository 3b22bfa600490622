//! Fault injection for the crash tests: `RIME_TEST_CRASH_AT=<point>` (or `<point>:<n>`, the n-th time)
//! aborts the process at that point, as a `kill -9` would, with nothing flushed or cleaned. It is read only
//! here, at the named points; unset (always, outside the tests) it does nothing. Points:
//! `checkpoint-commit` (between the two renames of a checkpoint commit).

use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Abort here when `RIME_TEST_CRASH_AT` names this point (and its count is reached).
pub(crate) fn point(name: &str) {
    let Ok(want) = std::env::var("RIME_TEST_CRASH_AT") else { return };
    let (point, nth) = match want.split_once(':') {
        Some((p, n)) => (p.to_string(), n.parse::<usize>().unwrap_or(1)),
        None => (want, 1),
    };
    if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        std::process::abort();
    }
}
