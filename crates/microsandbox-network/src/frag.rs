//! IPv4 fragment reassembly for the guest's datagrams, in front of the guard: a fragmented
//! UDP datagram (DNS included) or TCP segment is put back together here, and only the
//! whole packet is looked at (so the guard sees a SYN or a datagram with its ports and
//! checksum, never a piece of one). Pure code, bounded; the guest controls every byte.
//!
//! smoltcp's own reassembly (`proto-ipv4-fragmentation`) is not used: UDP never enters
//! smoltcp here (the stack relays it itself), and TCP SYNs must be seen whole before
//! smoltcp is asked to take them — one reassembler in front serves both.
//!
//! Bounds and rules: at most [`MAX_DATAGRAMS`] reassemblies in progress (the oldest is
//! evicted for a new one), each at most [`MAX_DATAGRAM`] bytes of payload and
//! [`MAX_PIECES`] fragments, dropped [`TIMEOUT`] after its first fragment. Any overlap
//! between fragments drops the whole datagram (no "first wins / last wins" games, the
//! teardrop family); an exact duplicate is ignored. Fragments must carry the guest's own
//! MAC and address (the caller checks) and agree on protocol.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv4Repr};

/// Reassemblies in progress at once.
pub const MAX_DATAGRAMS: usize = 16;
/// Largest reassembled IPv4 payload (total length 65,535 minus a 20-byte header).
pub const MAX_DATAGRAM: usize = 65_535 - 20;
/// Fragments per datagram at most (8-byte fragments would otherwise make 8,000).
pub const MAX_PIECES: usize = 128;
/// A datagram not complete this long after its first fragment is dropped.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    protocol: u8,
}

struct Partial {
    started: Instant,
    /// Ethernet header of the first fragment seen (the rebuilt frame's).
    eth: [u8; 14],
    hop_limit: u8,
    /// Payload bytes so far, at their offsets.
    data: Vec<u8>,
    /// Received ranges, `[start, end)`, kept sorted and disjoint.
    have: Vec<(usize, usize)>,
    /// Payload length, known once the last fragment (MF clear) arrived.
    total: Option<usize>,
}

/// What [`Reassembler::push`] made of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Kept; the datagram is not complete yet.
    Pending,
    /// The complete packet as one Ethernet frame (fresh 20-byte IPv4 header, no
    /// options, not fragmented).
    Complete(Vec<u8>),
    /// Dropped (malformed, too large, overlapping, too many pieces); the reason is for
    /// counters.
    Dropped(&'static str),
}

/// True when `frame` is an IPv4 fragment (MF set or a non-zero offset).
pub fn is_fragment(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return false };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return false };
    ip.more_frags() || ip.frag_offset() != 0
}

/// The reassemblies of one sandbox.
#[derive(Default)]
pub struct Reassembler {
    partial: HashMap<Key, Partial>,
}

impl Reassembler {
    pub fn new() -> Reassembler {
        Reassembler::default()
    }

    /// Datagrams in progress.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Bytes held for datagrams in progress.
    pub fn held(&self) -> usize {
        self.partial.values().map(|p| p.data.len()).sum()
    }

    /// Drops what timed out.
    pub fn expire(&mut self, now: Instant) {
        self.partial.retain(|_, p| now.duration_since(p.started) < TIMEOUT);
    }

    /// Takes one IPv4 fragment (an Ethernet frame for which [`is_fragment`] holds).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> Outcome {
        self.expire(now);
        let Ok(eth) = EthernetFrame::new_checked(frame) else { return Outcome::Dropped("malformed") };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return Outcome::Dropped("malformed") };
        if !ip.verify_checksum() {
            return Outcome::Dropped("bad header checksum");
        }
        let key = Key { src: ip.src_addr(), dst: ip.dst_addr(), id: ip.ident(), protocol: ip.next_header().into() };
        let start = usize::from(ip.frag_offset());
        let payload = ip.payload();
        let end = start + payload.len();
        let last = !ip.more_frags();
        // Every fragment but the last carries a multiple of 8 bytes (RFC 791).
        if payload.is_empty() || (!last && payload.len() % 8 != 0) || end > MAX_DATAGRAM {
            self.partial.remove(&key);
            return Outcome::Dropped("bad fragment size");
        }
        if !self.partial.contains_key(&key) && self.partial.len() >= MAX_DATAGRAMS {
            if let Some(oldest) = self.partial.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| *k) {
                self.partial.remove(&oldest);
            }
        }
        let p = self.partial.entry(key).or_insert_with(|| {
            let mut e = [0u8; 14];
            e.copy_from_slice(&frame[..14]);
            Partial { started: now, eth: e, hop_limit: ip.hop_limit(), data: Vec::new(), have: Vec::new(), total: None }
        });
        // Exact duplicates are harmless (retransmission); any other overlap is an attack.
        if p.have.contains(&(start, end)) {
            return Outcome::Pending;
        }
        if p.have.iter().any(|&(s, e)| start < e && s < end) {
            self.partial.remove(&key);
            return Outcome::Dropped("overlapping fragments");
        }
        if last {
            if p.total.is_some_and(|t| t != end) {
                self.partial.remove(&key);
                return Outcome::Dropped("two different last fragments");
            }
            p.total = Some(end);
        }
        if p.total.is_some_and(|t| end > t) || p.have.len() >= MAX_PIECES {
            self.partial.remove(&key);
            return Outcome::Dropped("fragment beyond the end, or too many");
        }
        if p.data.len() < end {
            p.data.resize(end, 0);
        }
        p.data[start..end].copy_from_slice(payload);
        let at = p.have.partition_point(|&(s, _)| s < start);
        p.have.insert(at, (start, end));
        let Some(total) = p.total else { return Outcome::Pending };
        // Complete when the ranges cover [0, total) without a gap.
        let mut covered = 0;
        for &(s, e) in &p.have {
            if s != covered {
                return Outcome::Pending;
            }
            covered = e;
        }
        if covered != total {
            return Outcome::Pending;
        }
        let Some(p) = self.partial.remove(&key) else { return Outcome::Pending };
        Outcome::Complete(rebuild(&p, key, total))
    }
}

/// One Ethernet frame with the whole datagram.
fn rebuild(p: &Partial, key: Key, total: usize) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: key.src,
        dst_addr: key.dst,
        next_header: IpProtocol::from(key.protocol),
        payload_len: total,
        hop_limit: p.hop_limit,
    };
    let mut out = vec![0u8; 14 + repr.buffer_len() + total];
    out[..14].copy_from_slice(&p.eth);
    let mut ip = Ipv4Packet::new_unchecked(&mut out[14..]);
    repr.emit(&mut ip, &ChecksumCapabilities::default());
    ip.set_ident(key.id);
    ip.fill_checksum();
    out[14 + repr.buffer_len()..].copy_from_slice(&p.data[..total]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetAddress, EthernetRepr};

    const SRC: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

    /// A fragment of datagram `id` carrying `data` at byte `offset`.
    fn fragment(id: u16, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        let repr = Ipv4Repr { src_addr: SRC, dst_addr: DST, next_header: IpProtocol::Udp, payload_len: data.len(), hop_limit: 64 };
        let eth = EthernetRepr { src_addr: EthernetAddress([2, 0, 0, 0, 0, 2]), dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]), ethertype: EthernetProtocol::Ipv4 };
        let mut buf = vec![0u8; 14 + 20 + data.len()];
        eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[14..]);
        repr.emit(&mut ip, &ChecksumCapabilities::default());
        ip.set_ident(id);
        ip.set_more_frags(more);
        ip.set_frag_offset(offset as u16);
        ip.fill_checksum();
        buf[34..].copy_from_slice(data);
        buf
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn whole(frame: &[u8]) -> Vec<u8> {
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum() && !ip.more_frags() && ip.frag_offset() == 0);
        ip.payload().to_vec()
    }

    #[test]
    fn reassembles_in_any_order() {
        let data = payload(3000);
        let pieces: Vec<(usize, bool)> = vec![(0, true), (1000, true), (2000, false)];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut r = Reassembler::new();
            let now = Instant::now();
            let mut got = None;
            for i in order {
                let (off, more) = pieces[i];
                let end = if more { off + 1000 } else { data.len() };
                match r.push(&fragment(7, off, more, &data[off..end]), now) {
                    Outcome::Complete(f) => got = Some(f),
                    Outcome::Pending => {}
                    Outcome::Dropped(why) => panic!("{why}"),
                }
            }
            assert_eq!(whole(&got.expect("complete")), data, "order {order:?}");
            assert!(r.is_empty());
        }
    }

    #[test]
    fn overlaps_duplicates_and_lies() {
        let data = payload(2000);
        let now = Instant::now();
        // Overlap (teardrop): the whole datagram goes.
        let mut r = Reassembler::new();
        assert_eq!(r.push(&fragment(1, 0, true, &data[..1000]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment(1, 992, false, &data[992..]), now), Outcome::Dropped("overlapping fragments"));
        assert!(r.is_empty());
        // An exact duplicate is ignored.
        assert_eq!(r.push(&fragment(2, 0, true, &data[..1000]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment(2, 0, true, &data[..1000]), now), Outcome::Pending);
        assert!(matches!(r.push(&fragment(2, 1000, false, &data[1000..]), now), Outcome::Complete(_)));
        // A middle fragment not a multiple of 8; two different ends; beyond 65,535.
        assert_eq!(r.push(&fragment(3, 0, true, &data[..1001]), now), Outcome::Dropped("bad fragment size"));
        assert_eq!(r.push(&fragment(4, 16, false, &data[..16]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment(4, 800, false, &data[..16]), now), Outcome::Dropped("two different last fragments"));
        assert_eq!(r.push(&fragment(5, 65528, false, &data[..16]), now), Outcome::Dropped("bad fragment size"));
        // A fragment past the known end.
        assert_eq!(r.push(&fragment(6, 16, false, &data[..16]), now), Outcome::Pending);
        assert!(matches!(r.push(&fragment(6, 64, true, &data[..16]), now), Outcome::Dropped(_)));
        // Bad header checksum.
        let mut f = fragment(8, 0, true, &data[..16]);
        f[24] ^= 1;
        assert_eq!(r.push(&f, now), Outcome::Dropped("bad header checksum"));
    }

    #[test]
    fn bounded_in_count_pieces_size_and_time() {
        let now = Instant::now();
        let mut r = Reassembler::new();
        // Never-completed datagrams: at most MAX_DATAGRAMS held, the oldest evicted.
        for id in 0..1000u16 {
            let _ = r.push(&fragment(id, 0, true, &payload(1480)), now + Duration::from_millis(u64::from(id)));
            assert!(r.len() <= MAX_DATAGRAMS);
        }
        assert!(r.held() <= MAX_DATAGRAMS * MAX_DATAGRAM);
        // Timeout.
        r.expire(now + Duration::from_secs(3600));
        assert!(r.is_empty());
        // Tiny pieces: at most MAX_PIECES per datagram.
        let mut dropped = false;
        for i in 0..(MAX_PIECES + 10) {
            if let Outcome::Dropped(_) = r.push(&fragment(9, i * 8, true, &[0u8; 8]), now) {
                dropped = true;
                break;
            }
        }
        assert!(dropped && r.is_empty());
        // Every truncation of a fragment is handled.
        let f = fragment(10, 0, true, &payload(64));
        for n in 0..f.len() {
            let _ = r.push(&f[..n], now);
        }
    }
}
