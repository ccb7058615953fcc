//! The host's TSC rate, handed to TCG guests as `tsc_early_khz=` so their clock runs at
//! the right speed.
//!
//! Under TCG the guest's `rdtsc` is the host's (QEMU returns the host counter), but the
//! guest kernel does not know its rate: `-cpu qemu64` has no CPUID frequency leaf, so it
//! calibrates against the emulated PIT and HPET at boot. On a loaded host the vCPU thread
//! is preempted during that 10 ms loop and the kernel can take a wildly wrong value —
//! measured: "PIT calibration deviates from HPET: 153428 2594900 … Using PIT calibration
//! value", a guest clock running 16.6× fast (87 s of guest uptime in 5.3 s), in 1 of 4
//! boots at load 14. `tsc=reliable` (kept for the idle-CPU target: no clocksource
//! watchdog timer) also turns off the watchdog that would have caught it, so the error
//! stays for the VM's life — and for every sandbox restored from a template booted that
//! way. With `tsc_early_khz` the early calibration is skipped; the kernel's own refinement
//! against the HPET a second later still corrects it (it accepts a refinement within
//! 1 %), so this measurement only has to be close, not exact.

use std::sync::OnceLock;

/// The kernel command-line word: `tsc_early_khz=<kHz>`.
pub const PARAM: &str = "tsc_early_khz";

/// Measured once per process; `None` when it cannot be measured (not x86_64, or the
/// samples disagree): the guest kernel then calibrates by itself, as before.
pub fn host_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(measure)
}

/// `cmdline` with the value of [`PARAM`] replaced by `host`: template keys must not
/// change with a measurement (a restored guest keeps its template's calibration), but
/// must differ from those of templates booted without it.
pub fn for_key(cmdline: &str) -> String {
    cmdline
        .split(' ')
        .map(|w| if w.starts_with(PARAM) && w[PARAM.len()..].starts_with('=') { "tsc_early_khz=host" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rates below or above this are not a TSC (or a broken measurement).
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

/// The median of three 10 ms windows, each end a (monotonic clock, TSC) pair read back
/// to back (retried until the clock reads bracket the TSC read within 20 µs, so a
/// preemption there cannot skew it by more than 0.4 %); `None` unless the three agree
/// within 1 %.
#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    use std::time::{Duration, Instant};

    fn pair() -> Option<(Instant, u64)> {
        for _ in 0..1000 {
            let before = Instant::now();
            // SAFETY: rdtsc has no preconditions on x86_64.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            let after = Instant::now();
            let gap = after - before;
            if gap < Duration::from_micros(20) {
                return Some((before + gap / 2, tsc));
            }
        }
        None
    }
    let mut rates = Vec::with_capacity(3);
    for _ in 0..3 {
        let (t0, c0) = pair()?;
        std::thread::sleep(Duration::from_millis(10));
        let (t1, c1) = pair()?;
        let ns = (t1 - t0).as_nanos() as u64;
        rates.push(c1.checked_sub(c0)?.checked_mul(1_000_000)? / ns.max(1));
    }
    rates.sort_unstable();
    let (lo, mid, hi) = (rates[0], rates[1], rates[2]);
    (PLAUSIBLE_KHZ.contains(&mid) && hi - lo <= mid / 100).then_some(mid)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_form_hides_the_value_only() {
        assert_eq!(for_key("a tsc_early_khz=2596102 b"), "a tsc_early_khz=host b");
        assert_eq!(for_key("a tsc_early_khzx=1 b"), "a tsc_early_khzx=1 b");
        assert_eq!(for_key("a b"), "a b");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measures_a_plausible_rate_that_is_stable() {
        // The host's TSC: two measurements agree within 1 % (the kernel's refinement window).
        let a = measure().expect("a TSC rate");
        let b = measure().expect("a TSC rate");
        assert!(PLAUSIBLE_KHZ.contains(&a), "{a} kHz");
        assert!(a.abs_diff(b) <= a / 100, "{a} vs {b} kHz");
    }
}
