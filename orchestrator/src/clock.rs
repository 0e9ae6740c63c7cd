//! Where time and fresh randomness come from. The system clock is read here and nowhere
//! else in the control plane (clippy's `disallowed-methods` keeps `SystemTime::now` out of
//! the rest of the tree); everything else takes a [`Clock`] or a `now` parameter, so tests
//! can drive time and replay stays deterministic.

/// Where time comes from; tests use a manual clock.
pub trait Clock: Send + Sync {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        wall_ms()
    }
}

/// The wall clock's Unix time in milliseconds (0 before 1970).
#[allow(clippy::disallowed_methods)] // reason: the one place that reads the system clock
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Ten random bytes from the OS: the random part of a new UUID v7 id
/// (`JobId::new_v7(clock.now_ms(), random10())`).
pub fn random10() -> [u8; 10] {
    let mut bytes = [0u8; 10];
    getrandom::getrandom(&mut bytes).expect("the OS random source works");
    bytes
}
