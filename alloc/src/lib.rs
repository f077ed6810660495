//! The allocator every kv program runs on: mimalloc, with the two settings
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
/// `options` checks it is the option `MIMALLOC_PURGE_DELAY` sets.
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

/// mimalloc's `mi_option_allow_thp`, its place in the same enum (the test
/// `options` checks it is the option `MIMALLOC_ALLOW_THP` sets).
const ALLOW_THP: mi_option_t = 43;

/// The variable with which an operator turns transparent huge pages back
/// on (`MIMALLOC_ALLOW_THP=1`).
const ALLOW_THP_VAR: &str = "MIMALLOC_ALLOW_THP";

/// Sets kv's allocator options, unless the environment sets them
/// (`MIMALLOC_PURGE_DELAY`, `MIMALLOC_ALLOW_THP`): the purge delay above,
/// and no transparent huge pages for this process. Call it first in
/// `main`, before any thread starts: mimalloc's option setters are not
/// thread safe.
///
/// Why no huge pages: mimalloc asks for them (`MADV_HUGEPAGE`), and the
/// first touch of each then stops the thread while the kernel zeroes 2 MiB
/// (1.5-4 ms on a VM that hands freed memory back to its host): a store
/// growing under writes stalls a worker's requests that long, again and
/// again. Redis turns them off for the same reason (`disable-thp yes`).
/// `kvctl local`, with and without (`MIMALLOC_ALLOW_THP=1`) side by side,
/// three rounds each: 100 B PUTs then 1 KiB PUTs over the same 100,000
/// keys (every copy grows), p99 of the 1 KiB PUTs 7.0-8.5 -> 2.9-3.4 ms at
/// 28.5-35.6k -> 32.7-37.7k ops/s; 1,000,000 keys loaded into a fresh
/// cluster 326-341k -> 402-429k keys/s at 4.96-5.24 -> 3.82-4.09 ms of
/// CPU per 1,000 keys; then steady 100 B PUTs and 90/10 reads and writes
/// on those keys the same (34-42k against 36-41k, 41-43k against
/// 40-45k ops/s). The first 100 B PUTs right after another cluster freed
/// a gigabyte had a p99.9 of 18-21 ms against 8-10 ms (not p99): probably
/// this VM's host, which takes freed pages back, faulting a whole 2 MiB
/// in for a 4 KiB touch.
pub fn configure() {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        set_option(PURGE_DELAY, PURGE_DELAY_MS);
    }
    if std::env::var_os(ALLOW_THP_VAR).is_none() {
        // mimalloc read the option when it started (before `main`) and
        // would have disabled huge pages itself then; from now on it no
        // longer asks for them, and the kernel gives the process none,
        // not even in memory mimalloc asked for before `main` (nor the
        // processes it starts: `kvctl local`'s nodes inherit it).
        set_option(ALLOW_THP, 0);
        disable_thp();
    }
}

/// The purge delay in force, in milliseconds.
pub fn purge_delay_ms() -> c_long {
    get_option(PURGE_DELAY)
}

/// mimalloc's allow-THP option as it stands (0: off).
pub fn allow_thp() -> c_long {
    get_option(ALLOW_THP)
}

/// Whether the kernel gives this process no transparent huge pages
/// (always false off Linux, which alone has them).
pub fn thp_disabled() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_GET_THP_DISABLE reads a flag of this process; the unused
    // arguments are zero as prctl(2) asks.
    #[allow(unsafe_code)]
    let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    #[cfg(not(target_os = "linux"))]
    let flag = 0;
    flag == 1
}

#[cfg(target_os = "linux")]
fn disable_thp() {
    // SAFETY: PR_SET_THP_DISABLE sets a flag of this process; the unused
    // arguments are zero as prctl(2) asks. A kernel without it returns an
    // error, and the process keeps its huge pages: nothing to handle.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Transparent huge pages are Linux's.
#[cfg(not(target_os = "linux"))]
fn disable_thp() {}

fn set_option(option: mi_option_t, value: c_long) {
    // SAFETY: `mi_option_set` writes one of mimalloc's option slots;
    // `option` is within its option enum, and calling it before other
    // threads exist rules out the unsynchronised access it warns of.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(option, value)
    }
}

fn get_option(option: mi_option_t) -> c_long {
    // SAFETY: reads one of mimalloc's option slots (initialising it from
    // the environment on first use); `option` is within its enum.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_get(option)
    }
}
