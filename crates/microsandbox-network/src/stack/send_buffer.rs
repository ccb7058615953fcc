//! Sizes the smoltcp send buffer (host → guest) of each relayed TCP connection.
//!
//! Why it is not simply `tcp_buffer`: the send buffer holds every byte in flight to the
//! guest until the guest acknowledges it, so it caps a download at one buffer per guest
//! round trip. Under TCG the guest acknowledges in bursts milliseconds apart while its
//! Linux receive window grows to ~1.8 MiB (`tcp_rmem` max / 2 with 512 MiB of memory): a
//! 256 KiB buffer kept the window a seventh full (measured: the guest's ACKs advertised
//! 28,522 << 6 bytes while every ACK acknowledged exactly the 262,144 bytes in flight).
//!
//! Why not large for every connection: a buffer the guest never drains stays allocated,
//! and pages a ring buffer ever cycled through stay resident until the connection
//! closes. So the extra room beyond `tcp_buffer` comes from a per-stack budget
//! ([`EXTRA_BUDGET`]): a new connection gets up to [`MAX_SEND_BUFFER`] while the budget
//! lasts, and `tcp_buffer` once it is spent; a connection returns its share when it is
//! freed. The stack's send buffers therefore never exceed
//! `max_connections × tcp_buffer + EXTRA_BUDGET` in all.

/// Largest send buffer of one connection: above the guest's largest receive window with
/// Linux's defaults (`tcp_rmem` max 6 MiB, half of it advertised), so the window, not
/// this buffer, bounds the bytes in flight.
pub const MAX_SEND_BUFFER: usize = 4 << 20;
/// Bytes of send buffer beyond `tcp_buffer` the connections of one stack share.
pub const EXTRA_BUDGET: usize = 32 << 20;

/// The per-stack budget of send-buffer room beyond the base size.
#[derive(Debug)]
pub struct SendBudget {
    left: usize,
}

impl Default for SendBudget {
    fn default() -> Self {
        SendBudget { left: EXTRA_BUDGET }
    }
}

impl SendBudget {
    /// The send-buffer size for a new connection whose base size is `base`, and the
    /// extra bytes taken from the budget (to be given back with [`SendBudget::release`]).
    pub fn grant(&mut self, base: usize) -> (usize, usize) {
        let extra = MAX_SEND_BUFFER.saturating_sub(base).min(self.left);
        self.left -= extra;
        (base + extra, extra)
    }

    /// Gives back what [`SendBudget::grant`] took for a connection that was freed.
    pub fn release(&mut self, extra: usize) {
        self.left = (self.left + extra).min(EXTRA_BUDGET);
    }

    /// Budget not granted now.
    pub fn left(&self) -> usize {
        self.left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_the_maximum_while_the_budget_lasts_then_the_base() {
        let base = 256 * 1024;
        let mut b = SendBudget::default();
        let full = EXTRA_BUDGET / (MAX_SEND_BUFFER - base);
        let mut granted = Vec::new();
        for _ in 0..full {
            let (size, extra) = b.grant(base);
            assert_eq!(size, MAX_SEND_BUFFER);
            assert_eq!(extra, MAX_SEND_BUFFER - base);
            granted.push(extra);
        }
        // The remainder, then nothing beyond the base.
        let (size, extra) = b.grant(base);
        assert_eq!(size, base + EXTRA_BUDGET % (MAX_SEND_BUFFER - base));
        granted.push(extra);
        for _ in 0..1000 {
            assert_eq!(b.grant(base), (base, 0));
        }
        assert_eq!(b.left(), 0);
        // Everything granted is given back, and never more than the budget.
        for e in granted {
            b.release(e);
        }
        assert_eq!(b.left(), EXTRA_BUDGET);
        b.release(1 << 20);
        assert_eq!(b.left(), EXTRA_BUDGET);
        assert_eq!(b.grant(base).0, MAX_SEND_BUFFER);
    }

    #[test]
    fn a_base_at_or_above_the_maximum_takes_nothing() {
        let mut b = SendBudget::default();
        assert_eq!(b.grant(MAX_SEND_BUFFER), (MAX_SEND_BUFFER, 0));
        assert_eq!(b.grant(MAX_SEND_BUFFER * 2), (MAX_SEND_BUFFER * 2, 0));
        assert_eq!(b.left(), EXTRA_BUDGET);
    }
}
