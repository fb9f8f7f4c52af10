//! Ctrl-C, SIGTERM and SIGHUP end the benchmark at its next step, by an
//! error like any other, so that everything it made is removed. (The
//! programs it runs are in the terminal's process group and get Ctrl-C
//! themselves; its loops are bounded in time.)

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches the signals (a caught signal is reset to its default in the
/// programs the benchmark starts).
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(signal, note as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once a signal has come.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps for `duration`, or less when a signal comes.
pub fn sleep(duration: std::time::Duration) -> Result<()> {
    let end = std::time::Instant::now() + duration;
    loop {
        check()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}
