//! Finding placeholders in a byte stream, in every spelling a guest can use to smuggle
//! one past a literal search.
//!
//! Each byte of a placeholder may appear literally, percent-encoded (`%24`, any hex
//! case), JSON/JavaScript-escaped (`\u0024`, `\x24`), independently per byte — so
//! `%24MSB_%4bEY` and `\u0024MSB_KEY` are both found. The stream may arrive in pieces of
//! any size (TCP writes, TLS records, chunks): the scanner keeps the shortest tail that
//! could still begin a match ([`Scanner::tail_len`]), so a placeholder split anywhere is
//! found exactly once, and memory stays bounded by the longest encoded placeholder.

/// Longest encoding of one byte (`\u0024`).
const MAX_ENC: usize = 6;

/// A streaming multi-placeholder search.
#[derive(Debug, Clone)]
pub struct Scanner {
    pats: Vec<Vec<u8>>,
    tail: Vec<u8>,
    keep: usize,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_at(buf: &[u8], at: usize, n: usize) -> Result<u32, bool> {
    // Err(true) = ran out of input (could still match), Err(false) = not hex.
    let mut v = 0u32;
    for i in 0..n {
        match buf.get(at + i) {
            None => return Err(true),
            Some(&b) => v = v * 16 + hex(b).ok_or(false)? as u32,
        }
    }
    Ok(v)
}

/// Outcome of matching one pattern at one position.
enum Step {
    Match,
    NoMatch,
    /// The input ended inside a possible match.
    Partial,
}

/// Matches one byte `c` at `buf[p..]`: `Ok(next position)`.
fn byte_at(buf: &[u8], p: usize, c: u8) -> Result<usize, bool> {
    let Some(&b) = buf.get(p) else { return Err(true) };
    if b == c {
        return Ok(p + 1);
    }
    match b {
        b'%' => match hex_at(buf, p + 1, 2) {
            Ok(v) if v == c as u32 => Ok(p + 3),
            Ok(_) => Err(false),
            Err(e) => Err(e),
        },
        b'\\' => match buf.get(p + 1) {
            None => Err(true),
            Some(b'u') | Some(b'U') => match hex_at(buf, p + 2, 4) {
                Ok(v) if v == c as u32 => Ok(p + 6),
                Ok(_) => Err(false),
                Err(e) => Err(e),
            },
            Some(b'x') => match hex_at(buf, p + 2, 2) {
                Ok(v) if v == c as u32 => Ok(p + 4),
                Ok(_) => Err(false),
                Err(e) => Err(e),
            },
            Some(_) => Err(false),
        },
        _ => Err(false),
    }
}

fn match_at(buf: &[u8], mut p: usize, pat: &[u8]) -> Step {
    for &c in pat {
        match byte_at(buf, p, c) {
            Ok(n) => p = n,
            Err(true) => return Step::Partial,
            Err(false) => return Step::NoMatch,
        }
    }
    Step::Match
}

/// Index of the first pattern found anywhere in `buf` (complete matches only).
pub fn find_any(buf: &[u8], pats: &[&[u8]]) -> Option<usize> {
    for p in 0..buf.len() {
        for (i, pat) in pats.iter().enumerate() {
            if let Step::Match = match_at(buf, p, pat) {
                return Some(i);
            }
        }
    }
    None
}

impl Scanner {
    pub fn new<P: AsRef<[u8]>>(pats: Vec<P>) -> Scanner {
        let pats: Vec<Vec<u8>> = pats.into_iter().map(|p| p.as_ref().to_vec()).filter(|p| !p.is_empty()).collect();
        let keep = pats.iter().map(|p| p.len() * MAX_ENC).max().unwrap_or(0);
        Scanner { pats, tail: Vec::new(), keep }
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.pats.is_empty()
    }

    /// Bytes carried between calls (bounded by 6 × the longest placeholder).
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }

    /// Scans the next piece of the stream; `Some(i)` = pattern `i` was found.
    pub fn feed(&mut self, data: &[u8]) -> Option<usize> {
        if self.pats.is_empty() {
            return None;
        }
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        let mut earliest_partial = buf.len();
        for p in 0..buf.len() {
            for (i, pat) in self.pats.iter().enumerate() {
                match match_at(&buf, p, pat) {
                    Step::Match => return Some(i),
                    Step::Partial => earliest_partial = earliest_partial.min(p),
                    Step::NoMatch => {}
                }
            }
        }
        // Keep only what could still start a match, never more than `keep` bytes.
        let from = earliest_partial.max(buf.len().saturating_sub(self.keep));
        self.tail = buf[from..].to_vec();
        None
    }

    /// Forgets the carried tail (at a boundary where a match cannot continue).
    pub fn reset(&mut self) {
        self.tail.clear();
    }
}

/// Replaces every literal occurrence of the patterns in `buf` (longest pattern first at a
/// position) by its value; returns the number of replacements.
pub fn replace_literal(buf: &[u8], subs: &[(&[u8], &[u8])], out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < buf.len() {
        let best = subs
            .iter()
            .filter(|(p, _)| !p.is_empty() && buf[i..].starts_with(p))
            .max_by_key(|(p, _)| p.len());
        match best {
            Some((p, v)) => {
                out.extend_from_slice(v);
                i += p.len();
                n += 1;
            }
            None => {
                out.push(buf[i]);
                i += 1;
            }
        }
    }
    n
}

/// Streaming literal replacement for bodies that pass through in pieces: holds back the
/// shortest tail that could be the start of a placeholder.
#[derive(Debug, Default)]
pub struct StreamReplacer {
    tail: Vec<u8>,
}

impl StreamReplacer {
    /// Replaces in `tail + data`, appending what is final to `out`.
    pub fn feed(&mut self, data: &[u8], subs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        // The longest suffix of buf that is a proper prefix of some pattern is held back.
        let mut hold = 0;
        for (p, _) in subs {
            for k in (1..p.len().min(buf.len() + 1)).rev() {
                if k > hold && buf.ends_with(&p[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        let cut = buf.len() - hold;
        replace_literal(&buf[..cut], subs, out);
        self.tail = buf[cut..].to_vec();
    }

    /// Flushes the held tail (end of the body).
    pub fn finish(&mut self, subs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let buf = std::mem::take(&mut self.tail);
        replace_literal(&buf, subs, out);
    }
}
