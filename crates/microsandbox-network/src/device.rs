//! The smoltcp [`Device`] of the stack: two bounded frame queues between the NIC link
//! (QEMU's stream socket) and smoltcp.
//!
//! Bounds are the back-pressure: when `tx` (stack → guest) is full, smoltcp neither sends
//! nor takes in frames, the stack stops reading the link, and QEMU stops the guest's NIC.
//! Nothing here drops a frame; the link reader decides what to drop before `rx`.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// Frames queued from the guest for smoltcp (the link reader stops at this many).
pub const RX_FRAMES: usize = 512;
/// Frames queued from smoltcp for the guest.
pub const TX_FRAMES: usize = 512;

pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    /// Largest Ethernet frame (MTU + header).
    max_frame: usize,
}

impl QueueDevice {
    pub fn new(max_frame: usize) -> Self {
        QueueDevice { rx: VecDeque::new(), tx: VecDeque::new(), max_frame }
    }

    pub fn rx_full(&self) -> bool {
        self.rx.len() >= RX_FRAMES
    }

    pub fn tx_full(&self) -> bool {
        self.tx.len() >= TX_FRAMES
    }
}

pub struct Rx(Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        // Taking a frame in may produce a reply: only when there is room for it.
        if self.tx_full() {
            return None;
        }
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        if self.tx_full() {
            return None;
        }
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp counts the Ethernet header in the MTU of an Ethernet device.
        caps.max_transmission_unit = self.max_frame;
        caps
    }
}
