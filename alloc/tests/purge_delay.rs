//! `configure` sets the purge delay, and the option it sets is the one
//! `MIMALLOC_PURGE_DELAY` names: the test runs itself again with that
//! variable and reads the option back. One test, so nothing else in this
//! process touches mimalloc's options meanwhile.

use std::process::Command;

const CHILD: &str = "KV_ALLOC_TEST_CHILD";

#[test]
fn configure_sets_the_purge_delay_unless_the_environment_does() {
    kv_alloc::configure();
    let from_env = std::env::var("MIMALLOC_PURGE_DELAY").ok();
    if std::env::var_os(CHILD).is_some() {
        // mimalloc read the variable when the option was first used, and
        // configure left it alone.
        assert_eq!(kv_alloc::purge_delay_ms(), 4321);
        return;
    }
    let expected = from_env.map_or(10_000, |v| v.parse().expect("a number"));
    assert_eq!(kv_alloc::purge_delay_ms(), expected);

    let exe = std::env::current_exe().expect("the test's own path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "configure_sets_the_purge_delay_unless_the_environment_does",
        ])
        .env(CHILD, "1")
        .env("MIMALLOC_PURGE_DELAY", "4321")
        .output()
        .expect("run the test again");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
