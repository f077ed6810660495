//! `configure` sets the purge delay and turns transparent huge pages off,
//! and the options it sets are the ones `MIMALLOC_PURGE_DELAY` and
//! `MIMALLOC_ALLOW_THP` name: the test runs itself again with those
//! variables and reads the options back (a wrong place in mimalloc's
//! option enum reads another option's value). One test, so nothing else in
//! this process touches mimalloc's options meanwhile.

use std::process::Command;

const CHILD: &str = "KV_ALLOC_TEST_CHILD";
const NAME: &str = "configure_sets_its_options_unless_the_environment_does";

#[test]
fn configure_sets_its_options_unless_the_environment_does() {
    kv_alloc::configure();
    if std::env::var_os(CHILD).is_some() {
        // mimalloc read the variables when the options were first used,
        // and configure left them alone. (Whether the kernel gives huge
        // pages is not this process's to say: a process inherits it.)
        assert_eq!(kv_alloc::purge_delay_ms(), 4321);
        assert_eq!(kv_alloc::allow_thp(), 7);
        return;
    }
    let purge = std::env::var("MIMALLOC_PURGE_DELAY").ok();
    assert_eq!(
        kv_alloc::purge_delay_ms(),
        purge.map_or(10_000, |v| v.parse().expect("a number"))
    );
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        assert_eq!(kv_alloc::allow_thp(), 0);
        assert_eq!(kv_alloc::thp_disabled(), cfg!(target_os = "linux"));
    }

    let exe = std::env::current_exe().expect("the test's own path");
    let out = Command::new(exe)
        .args(["--exact", NAME])
        .env(CHILD, "1")
        .env("MIMALLOC_PURGE_DELAY", "4321")
        .env("MIMALLOC_ALLOW_THP", "7")
        .output()
        .expect("run the test again");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
