//! The allocator every kv program runs on: mimalloc, with the one setting
//! kv changes. A program links it by calling [`configure`] first thing in
//! `main`.

use libmimalloc_sys::mi_option_t;
use std::os::raw::c_long;

// glibc's malloc spent a third of a bulk load's CPU in allocation; mimalloc
// keeps per-thread free lists and is several times cheaper for our small,
// short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in `enum mi_option_e` of
/// mimalloc v3's `mimalloc.h` (libmimalloc-sys does not name it). The test
/// `purge_delay` checks it is the option `MIMALLOC_PURGE_DELAY` sets.
const PURGE_DELAY: mi_option_t = 15;

/// How long freed memory stays mapped before mimalloc gives it back to the
/// OS. mimalloc's default is 1 s: during a bulk load the buffers freed each
/// second were given back and faulted in again, and on a kernel with
/// transparent huge pages each such fault zeroes a whole 2 MiB page (32% of
/// a worker's samples were the kernel's `clear_page_erms` under mimalloc).
/// With 10 s, `kvctl local` loading 1,000,000 keys, four rounds each, side
/// by side: 208-275k -> 245-287k keys/s, the workers' CPU 6.1-8.2 s ->
/// 5.8-6.8 s (-12% on the mean); PUTs after it unchanged. How much it buys
/// varies with how readily the kernel finds huge pages. A store's memory is
/// long-lived; what it frees is mostly buffers needed again soon.
const PURGE_DELAY_MS: c_long = 10_000;

/// The variable with which an operator overrides [`PURGE_DELAY_MS`].
const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// Sets kv's allocator options, unless the environment sets them
/// (`MIMALLOC_PURGE_DELAY`). Call it first in `main`, before any thread
/// starts: mimalloc's option setters are not thread safe.
pub fn configure() {
    if std::env::var_os(PURGE_DELAY_VAR).is_some() {
        return;
    }
    // SAFETY: `mi_option_set` writes one of mimalloc's option slots;
    // `PURGE_DELAY` is within its option enum, and calling it before other
    // threads exist rules out the unsynchronised access it warns of.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS)
    }
}

/// The purge delay in force, in milliseconds.
pub fn purge_delay_ms() -> c_long {
    // SAFETY: reads one of mimalloc's option slots (initialising it from
    // the environment on first use); `PURGE_DELAY` is within its enum.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_get(PURGE_DELAY)
    }
}
