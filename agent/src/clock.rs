//! The kernel's clocks that the programs compare expiries with, and the
//! boot they belong to.

use std::time::{Duration, SystemTime};

use nix::time::{ClockId, clock_gettime};

/// Where the kernel names the current boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Nanoseconds of `clock`, one the kernel has.
pub fn clock_ns(clock: ClockId) -> u64 {
    let t = clock_gettime(clock).expect("clock_gettime of a clock the kernel has");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Nanoseconds of `CLOCK_BOOTTIME` (`bpf_ktime_get_boot_ns` in the
/// programs): it does not jump and counts suspend.
pub fn boot_ns() -> u64 {
    clock_ns(ClockId::CLOCK_BOOTTIME)
}

/// Nanoseconds of `CLOCK_MONOTONIC`, the clock of learned addresses'
/// expiries (`bpf_ktime_get_coarse_ns` in the programs: the same clock as
/// of the last tick, so an entry lives at most one tick past its expiry).
/// It does not jump; unlike `CLOCK_BOOTTIME` it stops while the host is
/// suspended.
pub fn monotonic_ns() -> u64 {
    clock_ns(ClockId::CLOCK_MONOTONIC)
}

/// The current boot's id: boot-time instants of another boot mean nothing.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string(BOOT_ID)?.trim().to_owned())
}

/// The wall-clock time of the boot-time instant `at`, seen from `now`
/// (wall clock) and `now_boot` (boot time, the same moment).
pub fn wall_time(at: u64, now: SystemTime, now_boot: u64) -> SystemTime {
    if at >= now_boot {
        now + Duration::from_nanos(at - now_boot)
    } else {
        now - Duration::from_nanos(now_boot - at)
    }
}

/// The boot-time instant of the wall-clock time `at`, as far as the two
/// clocks agree now.
pub fn boot_ns_at(at: SystemTime) -> u64 {
    let (now, now_boot) = (SystemTime::now(), boot_ns());
    match at.duration_since(now) {
        Ok(ahead) => now_boot.saturating_add(ahead.as_nanos() as u64),
        Err(behind) => now_boot.saturating_sub(behind.duration().as_nanos() as u64),
    }
}

/// A duration as a humantime string (`"5s"`, `"1h"`), for configuration
/// keys.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s: String = serde::Deserialize::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}
