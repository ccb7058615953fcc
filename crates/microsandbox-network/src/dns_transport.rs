//! DNS transport of the gateway: the guest's queries (UDP, to any address on port 53)
//! are checked by the policy's DNS filter (`dns::DnsFilter`) and forwarded to the
//! upstream resolvers; answers are filtered (rebind protection, pins) before the guest
//! sees them. This module holds the pure message surgery the transport needs; the
//! sockets live in the stack.

/// Largest UDP answer for a query without EDNS (RFC 1035).
pub const CLASSIC_UDP_MAX: usize = 512;
/// Upper bound we honour for an EDNS payload size.
pub const EDNS_UDP_MAX: usize = 4096;
/// Queries in flight at once per sandbox; more are answered SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 64;

/// Length of the header + question section of a well-formed query (`None` if it is not).
fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.len() < 12 {
        return None;
    }
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let mut i = 12;
    for _ in 0..qdcount.min(4) {
        // Names in a question are uncompressed labels; pointers end the walk safely too.
        loop {
            let len = *msg.get(i)? as usize;
            if len == 0 {
                i += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            if len > 63 {
                return None;
            }
            i += 1 + len;
        }
        i += 4;
    }
    (i <= msg.len()).then_some(i)
}

/// The largest UDP answer the query's sender accepts: its EDNS size, else 512.
pub fn udp_limit(query: &[u8]) -> usize {
    let Some(end) = question_end(query) else { return CLASSIC_UDP_MAX };
    let arcount = u16::from_be_bytes([query[10], query[11]]);
    // An OPT record after the question: root name (0), type 41, class = payload size.
    if arcount > 0 && query.len() >= end + 5 && query[end] == 0 && query[end + 1..end + 3] == [0, 41] {
        let size = u16::from_be_bytes([query[end + 3], query[end + 4]]) as usize;
        return size.clamp(CLASSIC_UDP_MAX, EDNS_UDP_MAX);
    }
    CLASSIC_UDP_MAX
}

/// An answer to `query` with no records: its header (QR set, `rcode`, TC if `truncated`)
/// and question. Used for SERVFAIL after the resolvers failed, and for TC=1 when the
/// answer is too large for UDP (the client retries over TCP).
pub fn empty_answer(query: &[u8], rcode: u8, truncated: bool) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut out = query[..end].to_vec();
    // Byte 2: QR set, opcode and RD as the client sent them, TC as asked, AA off.
    out[2] = (out[2] & 0x79) | 0x80 | if truncated { 0x02 } else { 0 };
    // Byte 3: RA set, CD as the client sent it, AD off, the rcode.
    out[3] = (out[3] & 0x10) | 0x80 | (rcode & 0x0f);
    out[6..12].fill(0);
    Some(out)
}

/// The answer to send over UDP: `answer` itself if it fits the client's limit, else a
/// truncated (TC=1) empty answer.
pub fn fit_udp(query: &[u8], answer: Vec<u8>) -> Option<Vec<u8>> {
    if answer.len() <= udp_limit(query) {
        return Some(answer);
    }
    empty_answer(query, answer.get(3).map_or(0, |b| b & 0x0f), true)
}

/// True when `answer` answers `query` (same id and question), so a stray datagram on the
/// upstream socket is never passed on.
pub fn matches(query: &[u8], answer: &[u8]) -> bool {
    let Some(end) = question_end(query) else { return false };
    answer.len() >= end && answer[..2] == query[..2] && answer[2] & 0x80 != 0 && answer[12..end].eq_ignore_ascii_case(&query[12..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `example.test` A, optionally with an OPT record of `edns` bytes.
    fn query(edns: Option<u16>) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())];
        q.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        if let Some(size) = edns {
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&size.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        q
    }

    #[test]
    fn limits() {
        assert_eq!(udp_limit(&query(None)), 512);
        assert_eq!(udp_limit(&query(Some(1232))), 1232);
        assert_eq!(udp_limit(&query(Some(100))), 512);
        assert_eq!(udp_limit(&query(Some(65000))), EDNS_UDP_MAX);
        assert_eq!(udp_limit(&[1, 2, 3]), 512);
    }

    #[test]
    fn truncation_and_servfail() {
        let q = query(None);
        let mut big = q.clone();
        big[2] |= 0x80;
        big.resize(700, 0);
        let t = fit_udp(&q, big).unwrap();
        assert_eq!(t.len(), q.len());
        assert_eq!(t[2] & 0x82, 0x82, "QR and TC set");
        assert_eq!(&t[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        let s = empty_answer(&query(Some(1232)), 2, false).unwrap();
        assert_eq!(s[3] & 0x0f, 2);
        assert_eq!(s[2] & 0x02, 0);
        assert_eq!(u16::from_be_bytes([s[10], s[11]]), 0, "no OPT copied");
        let small = { let mut a = q.clone(); a[2] |= 0x80; a };
        assert_eq!(fit_udp(&q, small.clone()), Some(small));
    }

    #[test]
    fn answers_must_match_their_query() {
        let q = query(None);
        let mut a = q.clone();
        a[2] |= 0x80;
        assert!(matches(&q, &a));
        let mut other_id = a.clone();
        other_id[1] ^= 1;
        assert!(!matches(&q, &other_id));
        assert!(!matches(&q, &q), "a query is not an answer");
        assert!(!matches(&q, &a[..10]));
    }

    #[test]
    fn hostile_messages_do_not_panic() {
        for q in [&[][..], &[0; 12], &[0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0x3f]] {
            let _ = udp_limit(q);
            let _ = empty_answer(q, 2, true);
            let _ = matches(q, q);
        }
    }
}
