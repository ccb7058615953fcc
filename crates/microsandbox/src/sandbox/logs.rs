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

/// Sources a caller may ask for: the three an entry can have, plus "output" (stdout and
/// stderr) and "all".
pub const SOURCES: &[&str] = &["stdout", "stderr", "system", "output", "all"];
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
    /// Where the log continues after this entry ([`Cursor`]); pass it back as
    /// [`LogQuery::after`] to read only what follows.
    pub cursor: String,
}

/// A position in a sandbox's log, just after one entry.
///
/// The log is read in a fixed order: console lines (by their end offset in
/// `console.log`), then command output (by timestamp and, among lines with the same
/// millisecond, their order in the file). A position holds both: console bytes consumed
/// and the last output line passed. For a console entry the output part is the start (no
/// output line passed); for an output entry the console part is everything the read saw.
/// Serialized as `v1.<console_end>.<t>.<k>` (k: 1-based ordinal within millisecond t, 0
/// for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub console_end: u64,
    pub t: u64,
    pub k: u64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("v1.{}.{}.{}", self.console_end, self.t, self.k)
    }

    /// Parses a cursor this module made.
    pub fn parse(s: &str) -> Result<Cursor> {
        let bad = || Error::InvalidConfig(format!("{s:?} is not a log cursor (take one from LogEntry#cursor)"));
        let mut parts = s.strip_prefix("v1.").ok_or_else(bad)?.split('.');
        let mut num = || parts.next().and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad);
        let c = Cursor { console_end: num()?, t: num()?, k: num()? };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(c)
    }
}

/// What to read from a log. The default is everything (within the bounded read).
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Keep at most this many entries, the most recent.
    pub tail: Option<usize>,
    /// Only entries recorded at or after this Unix millisecond (console lines, which carry
    /// no time, are left out when a time bound is given).
    pub since_ms: Option<u64>,
    /// Only entries recorded before this Unix millisecond.
    pub until_ms: Option<u64>,
    /// Only entries after this position.
    pub after: Option<Cursor>,
    /// Sources (see [`SOURCES`]); empty means all.
    pub sources: Vec<String>,
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
    tail_at(path).0
}

/// [`tail_of`] and the file offset where the returned bytes start.
fn tail_at(path: &Path) -> (Vec<u8>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), 0) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut start = len.saturating_sub(MAX_READ);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return (Vec::new(), 0);
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX_READ).read_to_end(&mut buf);
    if start > 0 {
        match buf.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                buf.drain(..=nl).for_each(drop);
                start += nl as u64 + 1;
            }
            None => buf.clear(),
        }
    }
    (buf, start)
}

/// The last `tail` entries of `dir`'s logs from `sources` (all when empty).
pub fn read(dir: &Path, tail: usize, sources: &[String]) -> Result<Vec<LogEntry>> {
    query(dir, &LogQuery { tail: Some(tail), sources: sources.to_vec(), ..Default::default() })
}

/// The entries of `dir`'s logs that `q` selects, in log order (see [`Cursor`]).
pub fn query(dir: &Path, q: &LogQuery) -> Result<Vec<LogEntry>> {
    if let Some(bad) = q.sources.iter().find(|s| !SOURCES.contains(&s.as_str())) {
        return Err(Error::InvalidConfig(format!(
            "unknown log source {bad:?}; use \"stdout\", \"stderr\", \"system\", \"output\" or \"all\""
        )));
    }
    let sources = &q.sources;
    let want = |s: &str| {
        sources.is_empty()
            || sources.iter().any(|x| x == s || x == "all" || (x == "output" && (s == "stdout" || s == "stderr")))
    };
    let timed = q.since_ms.is_some() || q.until_ms.is_some();
    let in_window = |t: u64| q.since_ms.map_or(true, |s| t >= s) && q.until_ms.map_or(true, |u| t < u);
    let after = q.after.unwrap_or_default();
    let mut out = Vec::new();
    // Whether an entry's text is still to be decoded from its data, and its boot.
    let mut raw = Vec::new();
    let mut boots = Vec::new();
    // Whether an entry is selected (decoding needs the unselected chunks of a stream too).
    let mut keep = Vec::new();
    let (console, console_start) = tail_at(&dir.join("console.log"));
    let console_len = console_start + console.len() as u64;
    if want("system") {
        let mut end = console_start;
        // A last line still being written (no newline yet) is shown as it is; a read after
        // its cursor shows it again, whole, once it grew (its end moved past the cursor).
        for l in console.split_inclusive(|&b| b == b'\n') {
            end += l.len() as u64;
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            if l.iter().all(u8::is_ascii_whitespace) || timed || end <= after.console_end {
                continue;
            }
            out.push(LogEntry {
                source: "system".into(),
                text: String::from_utf8_lossy(l).into_owned(),
                data: l.to_vec(),
                session_id: None,
                timestamp_ms: None,
                cursor: Cursor { console_end: end, t: 0, k: 0 }.encode(),
            });
            raw.push(false);
            boots.push(None);
            keep.push(true);
        }
    }
    // Output lines passed so far with the current millisecond, to number them.
    let (mut last_t, mut k) = (u64::MAX, 0u64);
    let b64 = base64::engine::general_purpose::STANDARD;
    for file in ["logs.jsonl.1", "logs.jsonl"] {
        for l in tail_of(&dir.join(file)).split(|&b| b == b'\n') {
            // The file is ours, but a line cut by a crash must not fail the whole read.
            let Ok(line) = serde_json::from_slice::<Line>(l) else { continue };
            // Number every output line (selected or not), so positions do not depend on
            // the query.
            if line.t == last_t {
                k += 1;
            } else {
                (last_t, k) = (line.t, 1);
            }
            if !want(&line.source) {
                continue;
            }
            let selected = in_window(line.t) && (line.t, k) > (after.t, after.k);
            let (data, text, is_raw) = match (line.data, line.text) {
                (Some(d), _) => match b64.decode(d) {
                    Ok(bytes) => (bytes, String::new(), true),
                    Err(_) => continue,
                },
                (None, Some(t)) => (t.clone().into_bytes(), t, false),
                (None, None) => continue,
            };
            let cursor = Cursor { console_end: console_len, t: line.t, k }.encode();
            out.push(LogEntry { source: line.source, text, data, session_id: line.session, timestamp_ms: Some(line.t), cursor });
            raw.push(is_raw);
            boots.push(line.boot);
            keep.push(selected);
        }
    }
    decode_streams(&mut out, &raw, &boots);
    let mut kept: Vec<LogEntry> = out.into_iter().zip(keep).filter_map(|(e, k)| k.then_some(e)).collect();
    if let Some(tail) = q.tail {
        let skip = kept.len().saturating_sub(tail);
        kept = kept.split_off(skip);
    }
    Ok(kept)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cursors_and_source_groups() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("console.log"), "boot\nready\n").unwrap();
        let mut s = String::new();
        for (t, src, data) in [(10, "stdout", b"a" as &[u8]), (20, "stderr", b"b"), (20, "stdout", b"c"), (30, "stdout", b"d")] {
            s.push_str(&output_line(t, src, 1, 1, data));
        }
        s.push_str(&text_line(40, "system", "main process exited"));
        std::fs::write(d.path().join("logs.jsonl"), &s).unwrap();
        let q = |q: LogQuery| query(d.path(), &q).unwrap().into_iter().map(|e| e.text).collect::<Vec<_>>();
        let src = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(q(LogQuery::default()), ["boot", "ready", "a", "b", "c", "d", "main process exited"]);
        assert_eq!(q(LogQuery { sources: src(&["output"]), ..Default::default() }), ["a", "b", "c", "d"]);
        assert_eq!(q(LogQuery { sources: src(&["all"]), tail: Some(2), ..Default::default() }), ["d", "main process exited"]);
        // Time windows: since inclusive, until exclusive; console lines carry no time.
        assert_eq!(q(LogQuery { since_ms: Some(20), until_ms: Some(40), ..Default::default() }), ["b", "c", "d"]);
        assert_eq!(q(LogQuery { tail: Some(0), ..Default::default() }), Vec::<String>::new());
        // Cursors resume after their entry, whatever the source filter was.
        let all = query(d.path(), &LogQuery::default()).unwrap();
        let after = |i: usize, sources: &[&str]| {
            q(LogQuery { after: Some(Cursor::parse(&all[i].cursor).unwrap()), sources: src(sources), ..Default::default() })
        };
        assert_eq!(after(0, &[]), ["ready", "a", "b", "c", "d", "main process exited"]);
        assert_eq!(after(3, &[]), ["c", "d", "main process exited"]); // "b" and "c" share t=20
        assert_eq!(after(4, &["stdout"]), ["d"]);
        assert_eq!(after(6, &[]), Vec::<String>::new());
        // New output and console lines after a cursor show up.
        std::fs::write(d.path().join("console.log"), "boot\nready\nlate\n").unwrap();
        s.push_str(&output_line(50, "stdout", 1, 2, b"e"));
        std::fs::write(d.path().join("logs.jsonl"), &s).unwrap();
        assert_eq!(after(6, &[]), ["late", "e"]);
        assert!(Cursor::parse("v1.1.2").is_err());
        assert!(Cursor::parse("v1.1.2.3.4").is_err());
        assert!(Cursor::parse("x").is_err());
        assert_eq!(Cursor::parse(&all[3].cursor).unwrap(), Cursor { console_end: 11, t: 20, k: 1 });
    }

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
