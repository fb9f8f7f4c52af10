//! Helpers for the unit tests.

/// The rule for a unit test that cannot run here (the end-to-end tests'
/// twin is `idgate_tests::cannot_run`, tests/src/lib.rs): with
/// `IDGATE_E2E` set (to anything but empty or `0`, as CI sets it) it fails
/// (panics); without, it prints `skipped: REASON` and the caller returns.
#[track_caller]
pub fn cannot_run(reason: &str) {
    let must_run = std::env::var_os("IDGATE_E2E").is_some_and(|v| !v.is_empty() && v != "0");
    assert!(
        !must_run,
        "this test cannot run here: {reason} (IDGATE_E2E is set, so that fails the test instead of skipping it)"
    );
    eprintln!("skipped: {reason}");
}
