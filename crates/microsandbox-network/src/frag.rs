//! Fragment reassembly for the guest's datagrams, IPv4 and IPv6, in front of the guard: a
//! fragmented UDP datagram (DNS included) or TCP segment is put back together here, and
//! only the whole packet is looked at (so the guard sees a SYN or a datagram with its
//! ports and checksum, never a piece of one). Pure code, bounded; the guest controls
//! every byte.
//!
//! smoltcp's own reassembly (`proto-ipv4-fragmentation`, `proto-ipv6-fragmentation`) is
//! not used: UDP never enters smoltcp here (the stack relays it itself), and TCP SYNs must
//! be seen whole before smoltcp is asked to take them — one reassembler in front serves
//! both families and both protocols, under one memory bound.
//!
//! Bounds and rules (both families, one budget per sandbox): at most [`MAX_DATAGRAMS`]
//! reassemblies in progress (the oldest is evicted for a new one), each at most
//! [`MAX_DATAGRAM`] (IPv4) or [`MAX_DATAGRAM6`] (IPv6) bytes of payload and [`MAX_PIECES`]
//! fragments, dropped [`TIMEOUT`] after its first fragment — so at most 16 × 64 KiB is ever
//! held. Any overlap between fragments drops the whole datagram (no "first wins / last
//! wins" games, the teardrop family; RFC 5722 asks exactly this of IPv6); an exact
//! duplicate is ignored. Fragments must carry the guest's own MAC and address (the caller
//! checks) and agree on the protocol (it is part of the key).
//!
//! IPv6 specifics: the Fragment header must come right after the fixed header (the guest
//! has no use for hop-by-hop or routing headers on this link, and the guard drops them
//! anyway), so the reassembled packet is a fixed header plus the upper-layer packet; a
//! fragment whose next header is another Fragment header is dropped. An *atomic fragment*
//! (offset 0, M clear: a Fragment header on an unfragmented packet) is processed in
//! isolation, as RFC 6946 requires: its header is stripped and the packet passes on at
//! once, never mixed with a reassembly of the same identification.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr};

/// Reassemblies in progress at once (IPv4 and IPv6 together).
pub const MAX_DATAGRAMS: usize = 16;
/// Largest reassembled IPv4 payload (total length 65,535 minus a 20-byte header).
pub const MAX_DATAGRAM: usize = 65_535 - 20;
/// Largest reassembled IPv6 payload (the payload length field; no jumbograms).
pub const MAX_DATAGRAM6: usize = 65_535;
/// Fragments per datagram at most (8-byte fragments would otherwise make 8,000).
pub const MAX_PIECES: usize = 128;
/// A datagram not complete this long after its first fragment is dropped.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The IPv6 Fragment header's protocol number (RFC 8200 4.5) and length.
const FRAGMENT_HEADER: u8 = 44;
const FRAGMENT_HEADER_LEN: usize = 8;
/// IPv6 fixed header.
const IPV6_HEADER_LEN: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    /// The IPv4 identification (16 bits) or the IPv6 one (32 bits).
    id: u32,
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
    /// The complete packet as one Ethernet frame (IPv4: a fresh 20-byte header, no
    /// options, not fragmented; IPv6: the fixed header, no Fragment header).
    Complete(Vec<u8>),
    /// Dropped (malformed, too large, overlapping, too many pieces); the reason is for
    /// counters.
    Dropped(&'static str),
}

/// One fragment, family aside.
struct Piece<'a> {
    key: Key,
    /// Byte offset of `payload` in the datagram.
    start: usize,
    payload: &'a [u8],
    last: bool,
    hop_limit: u8,
    /// Largest payload of this family.
    max: usize,
}

/// True when `frame` is an IPv4 fragment (MF set or a non-zero offset) or an IPv6 packet
/// whose first extension header is a Fragment header (atomic fragments included).
pub fn is_fragment(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return false };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return false };
            ip.more_frags() || ip.frag_offset() != 0
        }
        EthernetProtocol::Ipv6 => {
            Ipv6Packet::new_checked(eth.payload()).is_ok_and(|ip| u8::from(ip.next_header()) == FRAGMENT_HEADER)
        }
        _ => false,
    }
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

    /// Takes one fragment (an Ethernet frame for which [`is_fragment`] holds).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> Outcome {
        self.expire(now);
        let Ok(eth) = EthernetFrame::new_checked(frame) else { return Outcome::Dropped("malformed") };
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return Outcome::Dropped("malformed") };
                if !ip.verify_checksum() {
                    return Outcome::Dropped("bad header checksum");
                }
                let key = Key { src: ip.src_addr().into(), dst: ip.dst_addr().into(), id: ip.ident().into(), protocol: ip.next_header().into() };
                let piece = Piece {
                    key,
                    start: usize::from(ip.frag_offset()),
                    payload: ip.payload(),
                    last: !ip.more_frags(),
                    hop_limit: ip.hop_limit(),
                    max: MAX_DATAGRAM,
                };
                self.insert(frame, piece, now)
            }
            EthernetProtocol::Ipv6 => self.push6(frame, eth.payload(), now),
            _ => Outcome::Dropped("malformed"),
        }
    }

    /// An IPv6 packet whose first extension header is a Fragment header.
    fn push6(&mut self, frame: &[u8], packet: &[u8], now: Instant) -> Outcome {
        let Ok(ip) = Ipv6Packet::new_checked(packet) else { return Outcome::Dropped("malformed") };
        let body = ip.payload();
        if u8::from(ip.next_header()) != FRAGMENT_HEADER || body.len() < FRAGMENT_HEADER_LEN {
            return Outcome::Dropped("malformed");
        }
        let (header, payload) = body.split_at(FRAGMENT_HEADER_LEN);
        let next_header = header[0];
        let offset_flags = u16::from_be_bytes([header[2], header[3]]);
        let start = usize::from(offset_flags >> 3) * 8;
        let more = offset_flags & 1 == 1;
        let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if next_header == FRAGMENT_HEADER {
            return Outcome::Dropped("a fragment of a fragment");
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if start == 0 && !more {
            // Atomic fragment (RFC 6946): the packet itself, on its own.
            if payload.is_empty() {
                return Outcome::Dropped("bad fragment size");
            }
            return Outcome::Complete(rebuild6(&frame[..14], src, dst, next_header, ip.hop_limit(), payload));
        }
        let key = Key { src: src.into(), dst: dst.into(), id, protocol: next_header };
        let piece = Piece { key, start, payload, last: !more, hop_limit: ip.hop_limit(), max: MAX_DATAGRAM6 };
        self.insert(frame, piece, now)
    }

    /// The family-independent part: bounds, overlaps, completion.
    fn insert(&mut self, frame: &[u8], piece: Piece<'_>, now: Instant) -> Outcome {
        let Piece { key, start, payload, last, hop_limit, max } = piece;
        let end = start + payload.len();
        // Every fragment but the last carries a multiple of 8 bytes (RFC 791, RFC 8200).
        if payload.is_empty() || (!last && payload.len() % 8 != 0) || end > max {
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
            Partial { started: now, eth: e, hop_limit, data: Vec::new(), have: Vec::new(), total: None }
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
        if p.total.is_some_and(|t| p.have.iter().any(|&(_, e)| e > t) || end > t) || p.have.len() >= MAX_PIECES {
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
        let data = &p.data[..total];
        match (key.src, key.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => rebuild4(&p, src, dst, key, data),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Outcome::Complete(rebuild6(&p.eth, src, dst, key.protocol, p.hop_limit, data)),
            _ => Outcome::Dropped("malformed"), // a key is built from one packet: one family
        }
    }
}

/// One Ethernet frame with the whole IPv4 datagram.
fn rebuild4(p: &Partial, src: Ipv4Addr, dst: Ipv4Addr, key: Key, data: &[u8]) -> Outcome {
    let repr = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::from(key.protocol), payload_len: data.len(), hop_limit: p.hop_limit };
    let mut out = vec![0u8; 14 + repr.buffer_len() + data.len()];
    out[..14].copy_from_slice(&p.eth);
    let mut ip = Ipv4Packet::new_unchecked(&mut out[14..]);
    repr.emit(&mut ip, &ChecksumCapabilities::default());
    ip.set_ident(key.id as u16);
    ip.fill_checksum();
    out[14 + repr.buffer_len()..].copy_from_slice(data);
    Outcome::Complete(out)
}

/// One Ethernet frame with the whole IPv6 packet (fixed header + `data`).
fn rebuild6(eth: &[u8], src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, hop_limit: u8, data: &[u8]) -> Vec<u8> {
    let repr = Ipv6Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::from(protocol), payload_len: data.len(), hop_limit };
    let mut out = vec![0u8; 14 + IPV6_HEADER_LEN + data.len()];
    out[..14].copy_from_slice(&eth[..14]);
    repr.emit(&mut Ipv6Packet::new_unchecked(&mut out[14..]));
    out[14 + IPV6_HEADER_LEN..].copy_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetAddress, EthernetRepr};

    const SRC: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 2);
    const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x6d73, 0, 0, 0, 0, 0x10);

    /// An IPv6 fragment of packet `id` (next header UDP) carrying `data` at byte `offset`.
    fn fragment6(id: u32, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        fragment6_of(IpProtocol::Udp, id, offset, more, data)
    }

    fn fragment6_of(next: IpProtocol, id: u32, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        let repr = Ipv6Repr { src_addr: SRC6, dst_addr: DST6, next_header: IpProtocol::Unknown(FRAGMENT_HEADER), payload_len: 8 + data.len(), hop_limit: 64 };
        let eth = EthernetRepr { src_addr: EthernetAddress([2, 0, 0, 0, 0, 2]), dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]), ethertype: EthernetProtocol::Ipv6 };
        let mut buf = vec![0u8; 14 + 40 + 8 + data.len()];
        eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
        repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[14..]));
        buf[54] = next.into();
        buf[56..58].copy_from_slice(&(((offset / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
        buf[58..62].copy_from_slice(&id.to_be_bytes());
        buf[62..].copy_from_slice(data);
        buf
    }

    /// The upper-layer payload of a reassembled IPv6 frame (no extension header left).
    fn whole6(frame: &[u8]) -> Vec<u8> {
        let ip = Ipv6Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Udp);
        assert_eq!((ip.src_addr(), ip.dst_addr(), ip.hop_limit()), (SRC6, DST6, 64));
        assert_eq!(&frame[..14], &fragment6(0, 0, false, b"x")[..14], "the fragments' Ethernet header");
        ip.payload().to_vec()
    }

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

    #[test]
    fn ipv6_reassembles_in_any_order_and_is_told_apart_from_ipv4() {
        let data = payload(3000);
        let pieces: Vec<(usize, bool)> = vec![(0, true), (1000, true), (2000, false)];
        assert!(is_fragment(&fragment6(1, 0, true, &data[..8])));
        assert!(is_fragment(&fragment6(1, 0, false, &data[..8])), "an atomic fragment is one");
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut r = Reassembler::new();
            let now = Instant::now();
            // An IPv4 datagram with the same identification is another datagram.
            assert_eq!(r.push(&fragment(7, 0, true, &data[..1000]), now), Outcome::Pending);
            let mut got = None;
            for i in order {
                let (off, more) = pieces[i];
                let end = if more { off + 1000 } else { data.len() };
                match r.push(&fragment6(7, off, more, &data[off..end]), now) {
                    Outcome::Complete(f) => got = Some(f),
                    Outcome::Pending => {}
                    Outcome::Dropped(why) => panic!("{why}"),
                }
            }
            assert_eq!(whole6(&got.expect("complete")), data, "order {order:?}");
            assert_eq!(r.len(), 1, "the IPv4 one is still pending");
        }
        // The largest IPv6 payload (65,535 bytes) in 1,448-byte pieces.
        let big = payload(MAX_DATAGRAM6);
        let mut r = Reassembler::new();
        let now = Instant::now();
        let mut got = None;
        for off in (0..big.len()).step_by(1448) {
            let end = (off + 1448).min(big.len());
            if let Outcome::Complete(f) = r.push(&fragment6(9, off, end < big.len(), &big[off..end]), now) {
                got = Some(f);
            }
        }
        assert_eq!(whole6(&got.expect("complete")), big);
    }

    #[test]
    fn ipv6_atomic_fragments_pass_alone() {
        let now = Instant::now();
        let mut r = Reassembler::new();
        let data = payload(24);
        // A reassembly with identification 5 in progress...
        assert_eq!(r.push(&fragment6(5, 0, true, &data[..16]), now), Outcome::Pending);
        // ...is not touched by an atomic fragment with the same identification (RFC 6946).
        let Outcome::Complete(f) = r.push(&fragment6(5, 0, false, &data), now) else { panic!("passes at once") };
        assert_eq!(whole6(&f), data);
        assert_eq!(r.len(), 1);
        let Outcome::Complete(f) = r.push(&fragment6(5, 16, false, &data[16..]), now) else { panic!("completes") };
        assert_eq!(whole6(&f), data);
        assert_eq!(r.push(&fragment6(6, 0, false, &[]), now), Outcome::Dropped("bad fragment size"));
        assert!(r.is_empty());
    }

    #[test]
    fn ipv6_overlaps_duplicates_and_lies() {
        let data = payload(2000);
        let now = Instant::now();
        let mut r = Reassembler::new();
        // Overlap (RFC 5722): the whole packet goes, also when the overlap comes first.
        assert_eq!(r.push(&fragment6(1, 0, true, &data[..1000]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment6(1, 992, false, &data[992..]), now), Outcome::Dropped("overlapping fragments"));
        assert!(r.is_empty());
        assert_eq!(r.push(&fragment6(11, 992, false, &data[992..]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment6(11, 0, true, &data[..1000]), now), Outcome::Dropped("overlapping fragments"));
        assert!(r.is_empty());
        // An exact duplicate is ignored.
        assert_eq!(r.push(&fragment6(2, 0, true, &data[..1000]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment6(2, 0, true, &data[..1000]), now), Outcome::Pending);
        assert!(matches!(r.push(&fragment6(2, 1000, false, &data[1000..]), now), Outcome::Complete(_)));
        // A middle fragment not a multiple of 8; two different ends; beyond 65,535.
        assert_eq!(r.push(&fragment6(3, 0, true, &data[..1001]), now), Outcome::Dropped("bad fragment size"));
        assert_eq!(r.push(&fragment6(4, 16, false, &data[..16]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment6(4, 800, false, &data[..16]), now), Outcome::Dropped("two different last fragments"));
        assert_eq!(r.push(&fragment6(5, 65528, false, &data[..16]), now), Outcome::Dropped("bad fragment size"));
        // A fragment past the known end, and an end before a fragment already held.
        assert_eq!(r.push(&fragment6(6, 16, false, &data[..16]), now), Outcome::Pending);
        assert!(matches!(r.push(&fragment6(6, 64, true, &data[..16]), now), Outcome::Dropped(_)));
        assert_eq!(r.push(&fragment6(7, 64, true, &data[..16]), now), Outcome::Pending);
        assert!(matches!(r.push(&fragment6(7, 16, false, &data[..16]), now), Outcome::Dropped(_)));
        // A fragment of a fragment; pieces of one identification with other protocols are
        // other packets (they time out alone).
        assert_eq!(r.push(&fragment6_of(IpProtocol::Unknown(FRAGMENT_HEADER), 8, 0, true, &data[..16]), now), Outcome::Dropped("a fragment of a fragment"));
        assert_eq!(r.push(&fragment6_of(IpProtocol::Tcp, 9, 0, true, &data[..16]), now), Outcome::Pending);
        assert_eq!(r.push(&fragment6(9, 16, false, &data[..16]), now), Outcome::Pending);
        assert_eq!(r.len(), 2);
        // A payload length beyond the buffer is malformed.
        let mut f = fragment6(10, 0, true, &data[..16]);
        f[18..20].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(r.push(&f, now), Outcome::Dropped("malformed"));
    }

    #[test]
    fn ipv6_bounded_in_count_pieces_size_and_time_together_with_ipv4() {
        let now = Instant::now();
        let mut r = Reassembler::new();
        // Never-completed packets of both families: at most MAX_DATAGRAMS held in all.
        for id in 0..1000u16 {
            let t = now + Duration::from_millis(u64::from(id));
            let _ = r.push(&fragment6(u32::from(id) << 16, 0, true, &payload(1448)), t);
            let _ = r.push(&fragment(id, 0, true, &payload(1480)), t);
            assert!(r.len() <= MAX_DATAGRAMS);
        }
        // The largest offsets allowed: a 64 KiB buffer each, no more.
        for id in 0..100u32 {
            let _ = r.push(&fragment6(id, MAX_DATAGRAM6 - 15, false, &payload(15)), now + Duration::from_secs(1));
            assert!(r.len() <= MAX_DATAGRAMS);
        }
        assert!(r.held() <= MAX_DATAGRAMS * MAX_DATAGRAM6, "{}", r.held());
        r.expire(now + Duration::from_secs(3600));
        assert!(r.is_empty());
        let mut dropped = false;
        for i in 0..(MAX_PIECES + 10) {
            if let Outcome::Dropped(_) = r.push(&fragment6(9, i * 8, true, &[0u8; 8]), now) {
                dropped = true;
                break;
            }
        }
        assert!(dropped && r.is_empty());
        let f = fragment6(10, 8, true, &payload(64));
        for n in 0..f.len() {
            let _ = r.push(&f[..n], now);
            let _ = is_fragment(&f[..n]);
        }
    }
}
