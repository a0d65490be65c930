//! The units the quota maths speaks, shared by every shape (a leaf: it imports nothing).

/// Microseconds since the Unix epoch (Redis `TIME` for shared decisions, the local clock otherwise).
pub type Micros = i64;

/// What one quota reports after a decision, for `RateLimit` headers and `/quotas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Requests (cost 1) that would be taken at once right after this decision.
    pub remaining: i64,
    /// Microseconds until the quota is whole again (bucket full, window reset, or the newest
    /// admission out of the rolling window).
    pub reset_in: Micros,
}
