//! The allocator every kv program runs on: mimalloc, with the two settings
//! kv changes. A program links it by calling [`configure`] first thing in
//! `main`.

use libmimalloc_sys::mi_option_t;
use std::os::raw::{c_long, c_ulong};

// glibc's malloc spent a third of a bulk load's CPU in allocation; mimalloc
// keeps per-thread free lists and is several times cheaper for our small,
// short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An option of mimalloc's that kv sets, unless the environment does.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Its place in `enum mi_option_e` of mimalloc v3's `mimalloc.h`
    /// (libmimalloc-sys does not name every option). The test `options`
    /// checks it is the option `var` sets.
    option: mi_option_t,
    /// The variable with which an operator overrides kv's value.
    pub var: &'static str,
    /// kv's value.
    pub value: c_long,
}

impl Setting {
    /// The value in force.
    pub fn get(&self) -> c_long {
        // SAFETY: reads one of mimalloc's option slots (initialising it
        // from the environment on first use); `option` is within its enum.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_get(self.option)
        }
    }
}

/// How long freed memory stays mapped before mimalloc gives it back to the
/// OS. mimalloc's default is 1 s: during a bulk load the buffers freed each
/// second were given back and faulted in again, and on a kernel with
/// transparent huge pages each such fault zeroes a whole 2 MiB page (32% of
/// a worker's samples were the kernel's `clear_page_erms` under mimalloc).
/// With 10 s, `kvctl local` loading 1,000,000 keys, four rounds each, side
/// by side: 208-275k -> 245-287k keys/s, the workers' CPU 6.1-8.2 s ->
/// 5.8-6.8 s (-12% on the mean); PUTs after it unchanged. A store's memory
/// is long-lived; what it frees is mostly buffers needed again soon. With
/// huge pages off ([`ALLOW_THP`]) a refault is cheap and the delay no
/// longer measures (1 s: 381-383k keys/s, 10 s: 385-391k); it stays for a
/// process given huge pages back.
pub const PURGE_DELAY: Setting = Setting {
    option: 15,
    var: "MIMALLOC_PURGE_DELAY",
    value: 10_000,
};

/// No transparent huge pages for kv's heap. mimalloc asks for them by
/// default (`madvise`), and every first touch of a 2 MiB region then
/// zeroes all of it at once while the worker's runtime thread waits: a
/// store that grows stalls its requests. `kvctl local`, alternating rounds:
/// bulk load of 1,000,000 keys 293-316k -> 385-416k keys/s at 5.2-5.5 ->
/// 3.9-4.2 s of the workers' CPU, their memory 294 -> 265 bytes per copy;
/// PUTs of 1 KiB values into a growing store p99 5.0-7.7 -> 2.5-2.9 ms.
/// Steady reads and writes on a store that no longer grows: within the
/// noise (90/10 45.6k vs 43.5k ops/s). Redis turns them off for itself for
/// the same reason (`disable-thp`).
pub const ALLOW_THP: Setting = Setting {
    option: 43,
    var: "MIMALLOC_ALLOW_THP",
    value: 0,
};

/// Sets kv's allocator options, each unless the environment sets it. Call
/// it first in `main`, before any thread starts: mimalloc's option setters
/// are not thread safe.
pub fn configure() {
    for setting in [PURGE_DELAY, ALLOW_THP] {
        if std::env::var_os(setting.var).is_some() {
            continue;
        }
        // SAFETY: `mi_option_set` writes one of mimalloc's option slots;
        // the option is within its enum, and calling it before other
        // threads exist rules out the unsynchronised access it warns of.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(setting.option, setting.value)
        }
    }
    // mimalloc turns huge pages off for the process itself only when its
    // variable says so as it starts, before `main`; set here, the option
    // only stops its own `madvise`, and a kernel set to `always` would
    // still hand out huge pages. So the same `prctl`, both ways: the flag
    // is inherited across `fork` and `exec` (the nodes `kvctl local`
    // starts get it), and a process told `MIMALLOC_ALLOW_THP=1` gets its
    // huge pages back.
    let disable = c_ulong::from(ALLOW_THP.get() == 0);
    // SAFETY: PR_SET_THP_DISABLE takes an integer and touches no memory of
    // ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, disable, 0, 0, 0);
    }
}

/// Whether transparent huge pages are off for this process.
pub fn thp_disabled() -> bool {
    // SAFETY: PR_GET_THP_DISABLE reads a flag of the process.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1
    }
}
