//! Time as the caller passes it in: tp-wire never reads a clock.

use core::ops::Add;
use core::time::Duration;

/// A point in time, in nanoseconds since an origin the caller chooses (smoltcp style).
///
/// The driver converts its clock (for example `std::time::Instant` minus a start time)
/// and passes the value to every `handle_*` call; deadlines come back in the same unit.
#[derive(Clone, Copy, Debug, Default, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct Instant(pub u64);

impl Instant {
    /// The origin.
    pub const ZERO: Self = Self(0);

    /// Creates an instant from nanoseconds since the origin.
    pub const fn from_nanos(ns: u64) -> Self {
        Self(ns)
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self` (zero if `earlier` is later).
    pub const fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Instant {
    /// Adds a duration, saturating at the far future.
    pub fn saturating_add(self, rhs: Duration) -> Self {
        let ns = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(ns))
    }
}

impl Add<Duration> for Instant {
    type Output = Self;

    /// Adds a duration, saturating at the far future.
    fn add(self, rhs: Duration) -> Self {
        self.saturating_add(rhs)
    }
}
