//! The sandbox log: session output recorded by its supervisor (`logs.jsonl`, rotated to
//! `logs.jsonl.1`) and the guest console (`console.log`, source `system`). Works for
//! stopped sandboxes too. Every read is bounded.
//!
//! # On-disk format
//!
//! One JSON object per line. Session output keeps the guest's raw bytes, base64 in
//! `data`, with the session id: `{"t": unix_ms, "source": "stdout", "session": 7,
//! "data": "Y2Fmww=="}` ([`output_line`]). Lines the supervisor writes itself (`system`)
//! and lines written before raw bytes were kept carry UTF-8 `text` instead; both forms
//! are read.
//!
//! # Decoding
//!
//! The guest writes bytes, not characters: one UTF-8 character may be split across two
//! or more chunks (`printf 'caf\303'; printf '\251'`). Each chunk stays its own entry with
//! its exact bytes, and text is decoded per stream (same boot, session and source) across
//! entries: a chunk ending in the first bytes of a character leaves them to the next chunk
//! of its stream ("caf" then "é\n"). Bytes that are invalid UTF-8 become U+FFFD in
//! the text only. A character still incomplete at the last chunk of its stream that was
//! read is U+FFFD too (the rest may not have been logged yet: a later read may show it).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Sources a caller may ask for.
pub const SOURCES: &[&str] = &["stdout", "stderr", "system"];
/// At most this many bytes are read from each log file (its end).
const MAX_READ: u64 = 4 << 20;

/// One log entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LogEntry {
    pub source: String,
    /// `data` decoded as UTF-8 across the chunk boundaries of its stream (see the module
    /// doc); invalid bytes are U+FFFD.
    pub text: String,
    /// The exact bytes (base64 when serialized: JSON strings cannot hold them).
    #[serde(serialize_with = "as_base64")]
    pub data: Vec<u8>,
    /// The guest session that wrote it; `None` for supervisor and console lines and for
    /// lines written before session ids were recorded.
    pub session_id: Option<u32>,
    /// Unix milliseconds; `None` for console lines, which carry no wall-clock time.
    pub timestamp_ms: Option<u64>,
}

fn as_base64<S: serde::Serializer>(data: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
}

#[derive(Deserialize)]
struct Line {
    t: u64,
    source: String,
    #[serde(default)]
    boot: Option<u64>,
    #[serde(default)]
    session: Option<u32>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// The log line for `bytes` that guest session `session` of the boot started at
/// `boot_ms` wrote to `source` (newline included).
pub fn output_line(at_ms: u64, source: &str, boot_ms: u64, session: u32, bytes: &[u8]) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut line =
        serde_json::json!({"t": at_ms, "source": source, "boot": boot_ms, "session": session, "data": data}).to_string();
    line.push('\n');
    line
}

/// The log line for a message of the supervisor's own (newline included).
pub fn text_line(at_ms: u64, source: &str, text: &str) -> String {
    let mut line = serde_json::json!({"t": at_ms, "source": source, "text": text}).to_string();
    line.push('\n');
    line
}

/// Decodes `buf` as UTF-8, invalid bytes as U+FFFD. With `hold`, an incomplete but so far
/// valid character at the end is not decoded; returns how many bytes it has (0..=3).
pub fn decode_chunk(buf: &[u8], hold: bool) -> (String, usize) {
    let mut out = String::with_capacity(buf.len());
    let mut rest = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return (out, 0);
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // SAFETY-free: `valid` bytes were just checked.
                out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        rest = &rest[valid + bad..];
                    }
                    None if hold => return (out, rest.len() - valid),
                    None => {
                        out.push('\u{FFFD}');
                        return (out, 0);
                    }
                }
            }
        }
    }
}

/// Fills in `text` of session entries (whose `data` is set), decoding each stream
/// (session, source) across its entries in order. Entries without a session keep their
/// text.
fn decode_streams(entries: &mut [LogEntry], raw: &[bool], boots: &[Option<u64>]) {
    type Key = (Option<u64>, Option<u32>, String);
    let key = |i: usize, e: &LogEntry| -> Key { (boots[i], e.session_id, e.source.clone()) };
    let mut last: HashMap<Key, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if raw[i] && e.session_id.is_some() {
            last.insert(key(i, e), i);
        }
    }
    let mut carry: HashMap<Key, Vec<u8>> = HashMap::new();
    for i in 0..entries.len() {
        if !raw[i] {
            continue;
        }
        let k = key(i, &entries[i]);
        let hold = entries[i].session_id.is_some() && last.get(&k) != Some(&i);
        let mut buf = carry.remove(&k).unwrap_or_default();
        buf.extend_from_slice(&entries[i].data);
        let (text, held) = decode_chunk(&buf, hold);
        if held > 0 {
            carry.insert(k, buf[buf.len() - held..].to_vec());
        }
        entries[i].text = text;
    }
}

/// The last `MAX_READ` bytes of `path`, starting at a line boundary.
fn tail_of(path: &Path) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_READ);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX_READ).read_to_end(&mut buf);
    if start > 0 {
        match buf.iter().position(|&b| b == b'\n') {
            Some(nl) => buf.drain(..=nl).for_each(drop),
            None => buf.clear(),
        }
    }
    buf
}

/// The last `tail` entries of `dir`'s logs from `sources` (all when empty).
pub fn read(dir: &Path, tail: usize, sources: &[String]) -> Result<Vec<LogEntry>> {
    if let Some(bad) = sources.iter().find(|s| !SOURCES.contains(&s.as_str())) {
        return Err(Error::InvalidConfig(format!("unknown log source {bad:?}; use \"stdout\", \"stderr\" or \"system\"")));
    }
    let want = |s: &str| sources.is_empty() || sources.iter().any(|x| x == s);
    let mut out = Vec::new();
    // Whether an entry's text is still to be decoded from its data, and its boot.
    let mut raw = Vec::new();
    let mut boots = Vec::new();
    if want("system") {
        let console = tail_of(&dir.join("console.log"));
        for l in console.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
            out.push(LogEntry {
                source: "system".into(),
                text: String::from_utf8_lossy(l).into_owned(),
                data: l.to_vec(),
                session_id: None,
                timestamp_ms: None,
            });
            raw.push(false);
            boots.push(None);
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for file in ["logs.jsonl.1", "logs.jsonl"] {
        for l in tail_of(&dir.join(file)).split(|&b| b == b'\n') {
            // The file is ours, but a line cut by a crash must not fail the whole read.
            let Ok(line) = serde_json::from_slice::<Line>(l) else { continue };
            if !want(&line.source) {
                continue;
            }
            let (data, text, is_raw) = match (line.data, line.text) {
                (Some(d), _) => match b64.decode(d) {
                    Ok(bytes) => (bytes, String::new(), true),
                    Err(_) => continue,
                },
                (None, Some(t)) => (t.clone().into_bytes(), t, false),
                (None, None) => continue,
            };
            out.push(LogEntry { source: line.source, text, data, session_id: line.session, timestamp_ms: Some(line.t) });
            raw.push(is_raw);
            boots.push(line.boot);
        }
    }
    decode_streams(&mut out, &raw, &boots);
    let skip = out.len().saturating_sub(tail);
    Ok(out.split_off(skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_sources_and_tails() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("console.log"), "boot line\n\n").unwrap();
        std::fs::write(
            d.path().join("logs.jsonl"),
            "{\"t\":1,\"source\":\"stdout\",\"text\":\"a\"}\nnot json\n{\"t\":2,\"source\":\"stderr\",\"text\":\"b\"}\n",
        )
        .unwrap();
        let all = read(d.path(), 100, &[]).unwrap();
        assert_eq!(all.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(), ["boot line", "a", "b"]);
        assert_eq!(all[1].data, b"a");
        let err = read(d.path(), 100, &["stderr".into()]).unwrap();
        assert_eq!(err.len(), 1);
        assert_eq!(read(d.path(), 1, &[]).unwrap()[0].text, "b");
        assert!(read(d.path(), 1, &["bogus".into()]).is_err());
    }

    fn write_chunks(dir: &Path, chunks: &[(&str, u32, &[u8])]) {
        write_boots(dir, &chunks.iter().map(|&(src, session, bytes)| (src, 1, session, bytes)).collect::<Vec<_>>());
    }

    fn write_boots(dir: &Path, chunks: &[(&str, u64, u32, &[u8])]) {
        let mut s = String::new();
        for (i, (src, boot, session, bytes)) in chunks.iter().enumerate() {
            s.push_str(&output_line(i as u64, src, *boot, *session, bytes));
        }
        std::fs::write(dir.join("logs.jsonl"), s).unwrap();
    }

    fn texts(dir: &Path, tail: usize) -> Vec<String> {
        read(dir, tail, &[]).unwrap().into_iter().map(|e| e.text).collect()
    }

    #[test]
    fn characters_split_across_chunks_decode_in_their_stream() {
        let d = tempfile::tempdir().unwrap();
        // A 2-byte character split on stdout, interleaved with another session and stderr.
        write_chunks(
            d.path(),
            &[
                ("stdout", 1, b"caf\xC3"),
                ("stderr", 1, b"e\xE2\x82"),
                ("stdout", 2, b"\xA9x"),
                ("stdout", 1, b"\xA9\n"),
                ("stderr", 1, b"\xAC"),
            ],
        );
        assert_eq!(texts(d.path(), 100), ["caf", "e", "\u{FFFD}x", "é\n", "€"]);
        // A tail that leaves out the first half still decodes the second.
        assert_eq!(texts(d.path(), 2), ["é\n", "€"]);
        let e = read(d.path(), 100, &[]).unwrap();
        assert_eq!(e[0].data, b"caf\xC3");
        assert_eq!(e[0].session_id, Some(1));
    }

    #[test]
    fn four_byte_character_in_three_chunks_and_real_invalid_bytes() {
        let d = tempfile::tempdir().unwrap();
        write_chunks(d.path(), &[("stdout", 3, b"\xF0"), ("stdout", 3, b"\x9F\x98"), ("stdout", 3, b"\x80!\xFF"), ("stdout", 3, b"z\xE2\x82")]);
        let e = read(d.path(), 100, &[]).unwrap();
        let t: Vec<_> = e.iter().map(|e| e.text.as_str()).collect();
        // Invalid bytes stay U+FFFD; so does a character still incomplete at the end.
        assert_eq!(t, ["", "", "😀!\u{FFFD}", "z\u{FFFD}"]);
        assert_eq!(e[2].data, b"\x80!\xFF");
        assert_eq!(e[3].data, b"z\xE2\x82");
    }

    #[test]
    fn the_same_session_id_in_another_boot_is_another_stream() {
        let d = tempfile::tempdir().unwrap();
        write_boots(d.path(), &[("stdout", 100, 1, b"a\xC3"), ("stdout", 200, 1, b"\xA9b")]);
        assert_eq!(texts(d.path(), 100), ["a\u{FFFD}", "\u{FFFD}b"]);
    }

    #[test]
    fn decode_chunk_holds_only_valid_prefixes() {
        assert_eq!(decode_chunk(b"ab\xE2\x82", true), ("ab".into(), 2));
        assert_eq!(decode_chunk(b"ab\xE2\x82", false), ("ab\u{FFFD}".into(), 0));
        // 0xC0 can never start a character: replaced, not held.
        assert_eq!(decode_chunk(b"ab\xC0", true), ("ab\u{FFFD}".into(), 0));
        assert_eq!(decode_chunk(b"\xED\xA0", true), ("\u{FFFD}\u{FFFD}".into(), 0));
    }
}
