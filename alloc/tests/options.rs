//! `configure` sets kv's allocator options, and each option it sets is the
//! one its variable names: the test runs itself again with the variables
//! set to other values and reads the options back. One test, so nothing
//! else in this process touches mimalloc's options meanwhile.

use kv_alloc::{ALLOW_THP, PURGE_DELAY};
use std::process::Command;

const CHILD: &str = "KV_ALLOC_TEST_CHILD";

#[test]
fn configure_sets_each_option_unless_the_environment_does() {
    kv_alloc::configure();
    if std::env::var_os(CHILD).is_some() {
        // mimalloc read the variables when the options were first used,
        // and configure left them alone.
        assert_eq!(PURGE_DELAY.get(), 4321);
        assert_eq!(ALLOW_THP.get(), 1);
        assert!(!kv_alloc::thp_disabled(), "huge pages were asked for");
        return;
    }
    for setting in [PURGE_DELAY, ALLOW_THP] {
        let expected =
            std::env::var(setting.var).map_or(setting.value, |v| v.parse().expect("a number"));
        assert_eq!(setting.get(), expected, "{}", setting.var);
    }
    assert_eq!(
        kv_alloc::thp_disabled(),
        ALLOW_THP.get() == 0,
        "huge pages are off for the process exactly when the option says"
    );

    let exe = std::env::current_exe().expect("the test's own path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "configure_sets_each_option_unless_the_environment_does",
        ])
        .env(CHILD, "1")
        .env(PURGE_DELAY.var, "4321")
        .env(ALLOW_THP.var, "1")
        .output()
        .expect("run the test again");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
