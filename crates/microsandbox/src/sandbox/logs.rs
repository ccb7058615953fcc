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

/// A session's output stream: boot, session, source. Text is decoded per stream.
type StreamKey = (Option<u64>, Option<u32>, String);

/// Bytes of an incomplete character at the end of each stream, waiting for the rest.
pub(crate) type Carry = HashMap<StreamKey, Vec<u8>>;

/// Fills in `text` of session entries (whose `data` is set), decoding each stream
/// (session, source) across its entries in order, starting from `carry` and leaving in
/// it what the last chunk of each stream held back. Without `hold_last`, the last chunk of
/// a stream holds nothing back (an incomplete character there is U+FFFD). Entries without
/// a session keep their text.
fn decode_streams(entries: &mut [LogEntry], raw: &[bool], boots: &[Option<u64>], carry: &mut Carry, hold_last: bool) {
    let key = |i: usize, e: &LogEntry| -> StreamKey { (boots[i], e.session_id, e.source.clone()) };
    let mut last: HashMap<StreamKey, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if raw[i] && e.session_id.is_some() {
            last.insert(key(i, e), i);
        }
    }
    for i in 0..entries.len() {
        if !raw[i] {
            continue;
        }
        let k = key(i, &entries[i]);
        let hold = entries[i].session_id.is_some() && (hold_last || last.get(&k) != Some(&i));
        let mut buf = carry.remove(&k).unwrap_or_default();
        buf.extend_from_slice(&entries[i].data);
        let (text, held) = decode_chunk(&buf, hold);
        if held > 0 {
            carry.insert(k, buf[buf.len() - held..].to_vec());
        }
        entries[i].text = text;
    }
}

/// The end of a file, as read: its bytes from `start`, and which file it was.
struct Tail {
    buf: Vec<u8>,
    start: u64,
    /// The file's inode (a rotation replaces the file under the same name).
    ino: Option<u64>,
}

/// The last `MAX_READ` bytes of `path`, starting at a line boundary.
fn tail_at(path: &Path) -> Tail {
    use std::os::unix::fs::MetadataExt;
    let empty = Tail { buf: Vec::new(), start: 0, ino: None };
    let Ok(mut f) = std::fs::File::open(path) else { return empty };
    let Ok(meta) = f.metadata() else { return empty };
    let mut start = meta.len().saturating_sub(MAX_READ);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return empty;
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
    Tail { buf, start, ino: Some(meta.ino()) }
}

/// The last `tail` entries of `dir`'s logs from `sources` (all when empty).
pub fn read(dir: &Path, tail: usize, sources: &[String]) -> Result<Vec<LogEntry>> {
    query(dir, &LogQuery { tail: Some(tail), sources: sources.to_vec(), ..Default::default() })
}

/// Which entries a read keeps (a [`LogQuery`] without its tail).
#[derive(Debug, Clone, Default)]
pub(crate) struct Select {
    sources: Vec<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    after: Cursor,
}

impl Select {
    fn new(q: &LogQuery) -> Result<Select> {
        if let Some(bad) = q.sources.iter().find(|s| !SOURCES.contains(&s.as_str())) {
            return Err(Error::InvalidConfig(format!(
                "unknown log source {bad:?}; use \"stdout\", \"stderr\", \"system\", \"output\" or \"all\""
            )));
        }
        Ok(Select { sources: q.sources.clone(), since_ms: q.since_ms, until_ms: q.until_ms, after: q.after.unwrap_or_default() })
    }

    fn want(&self, s: &str) -> bool {
        self.sources.is_empty()
            || self.sources.iter().any(|x| x == s || x == "all" || (x == "output" && (s == "stdout" || s == "stderr")))
    }

    /// Console lines carry no time, so a time bound leaves them out.
    fn timed(&self) -> bool {
        self.since_ms.is_some() || self.until_ms.is_some()
    }

    fn in_window(&self, t: u64) -> bool {
        self.since_ms.map_or(true, |s| t >= s) && self.until_ms.map_or(true, |u| t < u)
    }
}

/// Numbers output lines within their millisecond ([`Cursor::k`]), across the lines read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Numbering {
    last_t: u64,
    k: u64,
}

impl Default for Numbering {
    fn default() -> Self {
        Numbering { last_t: u64::MAX, k: 0 }
    }
}

impl Numbering {
    /// The ordinal of the next line, recorded at millisecond `t`.
    fn next(&mut self, t: u64) -> u64 {
        if t == self.last_t {
            self.k += 1;
        } else {
            (self.last_t, self.k) = (t, 1);
        }
        self.k
    }

    /// The position of the last line numbered: (t, k), (0, 0) before any.
    fn passed(&self) -> (u64, u64) {
        if self.last_t == u64::MAX {
            (0, 0)
        } else {
            (self.last_t, self.k)
        }
    }
}

/// Entries read, in log order, before decoding and selection (decoding needs the
/// unselected chunks of a stream too).
#[derive(Default)]
struct Batch {
    entries: Vec<LogEntry>,
    /// Whether an entry's text is still to be decoded from its data.
    raw: Vec<bool>,
    boots: Vec<Option<u64>>,
    keep: Vec<bool>,
}

impl Batch {
    /// Adds the console lines of `buf`, which starts at file offset `start`. With
    /// `complete_only`, a last line without its newline is left out (a follower shows it
    /// once it is complete); otherwise it is shown as it is, and a read after its cursor
    /// shows it again, whole, once it grew. `output` is the output position the entries'
    /// cursors carry. Returns the offset after the last complete line.
    fn console_lines(&mut self, buf: &[u8], start: u64, sel: &Select, complete_only: bool, output: (u64, u64)) -> u64 {
        let mut end = start;
        let mut complete_end = start;
        for l in buf.split_inclusive(|&b| b == b'\n') {
            end += l.len() as u64;
            let whole = l.ends_with(b"\n");
            if whole {
                complete_end = end;
            } else if complete_only {
                break;
            }
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            if !sel.want("system") || l.iter().all(u8::is_ascii_whitespace) || sel.timed() || end <= sel.after.console_end {
                continue;
            }
            self.entries.push(LogEntry {
                source: "system".into(),
                text: String::from_utf8_lossy(l).into_owned(),
                data: l.to_vec(),
                session_id: None,
                timestamp_ms: None,
                cursor: Cursor { console_end: end, t: output.0, k: output.1 }.encode(),
            });
            self.raw.push(false);
            self.boots.push(None);
            self.keep.push(true);
        }
        complete_end
    }

    /// Adds the output lines of `buf` (whole lines; a line that does not parse, e.g. cut
    /// by a crash, is skipped), numbering them with `num`. `console_end` is the console
    /// position their cursors carry.
    fn output_lines(&mut self, buf: &[u8], num: &mut Numbering, console_end: u64, sel: &Select) {
        let b64 = base64::engine::general_purpose::STANDARD;
        for l in buf.split(|&b| b == b'\n') {
            // The file is ours, but a line cut by a crash must not fail the whole read.
            let Ok(line) = serde_json::from_slice::<Line>(l) else { continue };
            // Number every output line (selected or not), so positions do not depend on
            // the query.
            let k = num.next(line.t);
            if !sel.want(&line.source) {
                continue;
            }
            let selected = sel.in_window(line.t) && (line.t, k) > (sel.after.t, sel.after.k);
            let (data, text, is_raw) = match (line.data, line.text) {
                (Some(d), _) => match b64.decode(d) {
                    Ok(bytes) => (bytes, String::new(), true),
                    Err(_) => continue,
                },
                (None, Some(t)) => (t.clone().into_bytes(), t, false),
                (None, None) => continue,
            };
            let cursor = Cursor { console_end, t: line.t, k }.encode();
            self.entries.push(LogEntry { source: line.source, text, data, session_id: line.session, timestamp_ms: Some(line.t), cursor });
            self.raw.push(is_raw);
            self.boots.push(line.boot);
            self.keep.push(selected);
        }
    }

    /// Decodes (see [`decode_streams`]) and returns the selected entries.
    fn finish(mut self, carry: &mut Carry, hold_last: bool) -> Vec<LogEntry> {
        decode_streams(&mut self.entries, &self.raw, &self.boots, carry, hold_last);
        self.entries.into_iter().zip(self.keep).filter_map(|(e, k)| k.then_some(e)).collect()
    }
}

/// The entries of `dir`'s logs that `q` selects, in log order (see [`Cursor`]).
pub fn query(dir: &Path, q: &LogQuery) -> Result<Vec<LogEntry>> {
    let sel = Select::new(q)?;
    let mut batch = Batch::default();
    let console = tail_at(&dir.join("console.log"));
    let console_len = console.start + console.buf.len() as u64;
    batch.console_lines(&console.buf, console.start, &sel, false, (0, 0));
    let mut num = Numbering::default();
    for file in ["logs.jsonl.1", "logs.jsonl"] {
        batch.output_lines(&tail_at(&dir.join(file)).buf, &mut num, console_len, &sel);
    }
    let mut kept = batch.finish(&mut Carry::new(), false);
    if let Some(tail) = q.tail {
        let skip = kept.len().saturating_sub(tail);
        kept = kept.split_off(skip);
    }
    Ok(kept)
}

/// Where a [`LogFollower`] is in one file.
#[derive(Debug, Clone, Copy, Default)]
struct FilePos {
    /// The file being read (`None`: it did not exist yet).
    ino: Option<u64>,
    /// Bytes consumed: the end of the last whole line read.
    offset: u64,
}

/// `log_stream(follow: true)`: the history a [`LogQuery`] selects, then only what is new.
///
/// The history is one bounded read like [`query`]; after it the follower keeps, per file,
/// its inode and the offset after the last whole line it consumed, so each
/// [`poll`](Self::poll) reads just the bytes appended since (at most `MAX_READ` per file
/// and poll; the rest waits for the next poll). When the supervisor rotates `logs.jsonl`
/// (renames it to `logs.jsonl.1` and starts a new one), the follower finishes the old file
/// under its new name from its offset, then reads the new file from its start: no entry is
/// lost or shown twice. Only two rotations between polls (16 MiB logged within one poll
/// interval) lose the file in between (and, as the newest file may then reuse the freed
/// inode, possibly the one after it up to that poll). A restart truncates `console.log`; the follower
/// then reads it from its start. Line numbering and the UTF-8 decoding of each stream
/// continue across polls, so cursors are those [`query`] gives and a character split
/// between polls is whole in the later entry.
#[derive(Debug)]
pub struct LogFollower {
    dir: std::path::PathBuf,
    sel: Select,
    console: FilePos,
    output: FilePos,
    num: Numbering,
    carry: Carry,
    /// Bytes read from files by the last history read or poll (for tests).
    last_read: u64,
}

/// Reads what `path` holds past `pos` (at most `limit` bytes, whole lines), advancing
/// `pos`. A different file under the name (rotated, recreated) or a shorter one
/// (truncated) is read from its start. Returns the bytes and the offset they start at.
fn read_new(path: &Path, pos: &mut FilePos, limit: u64, read: &mut u64) -> (Vec<u8>, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), pos.offset) };
    let Ok(meta) = f.metadata() else { return (Vec::new(), pos.offset) };
    if pos.ino != Some(meta.ino()) || meta.len() < pos.offset {
        *pos = FilePos { ino: Some(meta.ino()), offset: 0 };
    }
    let start = pos.offset;
    if meta.len() == start || f.seek(SeekFrom::Start(start)).is_err() {
        return (Vec::new(), start);
    }
    let mut buf = Vec::new();
    let _ = f.take(limit).read_to_end(&mut buf);
    *read += buf.len() as u64;
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(nl) => buf.truncate(nl + 1),
        // One line longer than the limit can never be read whole: pass over it.
        None if buf.len() as u64 == limit => buf.clear(),
        None => {
            buf.clear();
            return (buf, start);
        }
    }
    pos.offset = start + if buf.is_empty() { limit } else { buf.len() as u64 };
    (buf, start)
}

fn ino_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// A rotated file holds at most this much (the supervisor rotates at 8 MiB); the rest of
/// one is read in a single poll.
const MAX_ROTATED: u64 = 16 << 20;

impl LogFollower {
    /// Reads the history `q` selects (its `tail` is ignored) and returns it with a
    /// follower positioned after it.
    pub fn start(dir: &Path, q: &LogQuery) -> Result<(LogFollower, Vec<LogEntry>)> {
        let sel = Select::new(q)?;
        let mut batch = Batch::default();
        let console = tail_at(&dir.join("console.log"));
        let console_end = batch.console_lines(&console.buf, console.start, &sel, true, (0, 0));
        let mut num = Numbering::default();
        let old = tail_at(&dir.join("logs.jsonl.1"));
        batch.output_lines(&old.buf, &mut num, console_end, &sel);
        let cur = tail_at(&dir.join("logs.jsonl"));
        // Only whole lines are consumed: a line still being written is read next time.
        let whole = cur.buf.iter().rposition(|&b| b == b'\n').map_or(0, |nl| nl + 1);
        batch.output_lines(&cur.buf[..whole], &mut num, console_end, &sel);
        let mut carry = Carry::new();
        let history = batch.finish(&mut carry, true);
        let follower = LogFollower {
            dir: dir.to_path_buf(),
            // What follows is after the history by construction: comparing with the
            // starting cursor could only hide lines (a clock stepping back, a console
            // log that a restart truncated).
            sel: Select { after: Cursor::default(), ..sel },
            console: FilePos { ino: console.ino, offset: console_end },
            output: FilePos { ino: cur.ino, offset: cur.start + whole as u64 },
            num,
            carry,
            last_read: (console.buf.len() + old.buf.len() + cur.buf.len()) as u64,
        };
        Ok((follower, history))
    }

    /// The entries logged since the last call (or the history), in log order.
    pub fn poll(&mut self) -> Vec<LogEntry> {
        let mut read = 0;
        let mut batch = Batch::default();
        let (console, start) = read_new(&self.dir.join("console.log"), &mut self.console, MAX_READ, &mut read);
        batch.console_lines(&console, start, &self.sel, true, self.num.passed());
        let current = self.dir.join("logs.jsonl");
        let rotated = self.dir.join("logs.jsonl.1");
        let now = ino_of(&current);
        if self.output.ino.is_some() && now != self.output.ino {
            // Rotated since the last poll: finish the file we were reading, now under the
            // rotated name; if that is another file already, it was rotated twice and
            // only the newer one is left: read it whole.
            let mut old = self.output;
            if ino_of(&rotated) != old.ino {
                old = FilePos::default();
            }
            let (buf, _) = read_new(&rotated, &mut old, MAX_ROTATED, &mut read);
            batch.output_lines(&buf, &mut self.num, self.console.offset, &self.sel);
            self.output = FilePos { ino: now, offset: 0 };
        }
        let (buf, _) = read_new(&current, &mut self.output, MAX_READ, &mut read);
        batch.output_lines(&buf, &mut self.num, self.console.offset, &self.sel);
        self.last_read = read;
        batch.finish(&mut self.carry, true)
    }

    /// Bytes the last [`start`](Self::start) or [`poll`](Self::poll) read from files.
    pub fn last_read_bytes(&self) -> u64 {
        self.last_read
    }
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

    fn append(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(bytes).unwrap();
    }

    fn texts_of(entries: &[LogEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.text.as_str()).collect()
    }

    #[test]
    fn follower_reads_only_what_is_new_and_loses_nothing_across_rotations() {
        let d = tempfile::tempdir().unwrap();
        let (log, rotated, console) = (d.path().join("logs.jsonl"), d.path().join("logs.jsonl.1"), d.path().join("console.log"));
        let line = |t: u64, bytes: &[u8]| output_line(t, "stdout", 1, 1, bytes);
        // A big history: the follower reads it once, then only what is appended.
        let filler = "x".repeat(1000);
        for t in 0..2000 {
            append(&log, line(t, filler.as_bytes()).as_bytes());
        }
        append(&log, line(2000, b"a").as_bytes());
        std::fs::write(&console, "boot\n").unwrap();
        let (mut f, history) = LogFollower::start(d.path(), &LogQuery { sources: vec!["all".into()], ..Default::default() }).unwrap();
        assert_eq!(history.first().unwrap().text, "boot");
        assert_eq!(history.last().unwrap().text, "a");
        assert!(f.last_read_bytes() > 2_000_000);
        assert!(f.poll().is_empty());
        assert_eq!(f.last_read_bytes(), 0, "nothing new, nothing read");

        let c = line(2001, b"c");
        append(&log, c.as_bytes());
        append(&console, b"more\n");
        assert_eq!(texts_of(&f.poll()), ["more", "c"]);
        assert_eq!(f.last_read_bytes(), c.len() as u64 + 5);

        // A line seen half-written is read once it is whole.
        let l = line(2002, b"d");
        append(&log, &l.as_bytes()[..10]);
        assert!(f.poll().is_empty());
        append(&log, &l.as_bytes()[10..]);
        assert_eq!(texts_of(&f.poll()), ["d"]);

        // Rotation: what was appended to the old file before it was renamed still comes,
        // once, then the new file from its start.
        append(&log, line(2003, b"e").as_bytes());
        std::fs::rename(&log, &rotated).unwrap();
        append(&log, line(2004, b"f").as_bytes());
        let got = f.poll();
        assert_eq!(texts_of(&got), ["e", "f"]);
        append(&log, line(2005, b"g").as_bytes());
        let g = f.poll();
        assert_eq!(texts_of(&g), ["g"]);
        assert!(f.poll().is_empty());
        // Cursors are the ones a query gives: resuming from one with a query continues there.
        assert_eq!(Cursor::parse(&g[0].cursor).unwrap(), Cursor { console_end: 10, t: 2005, k: 1 });
        let after_e = LogQuery { after: Some(Cursor::parse(&got[0].cursor).unwrap()), ..Default::default() };
        assert_eq!(texts_of(&query(d.path(), &after_e).unwrap()), ["f", "g"]);

        // A character split between two polls is whole in the later entry.
        append(&log, line(2006, b"caf\xC3").as_bytes());
        assert_eq!(texts_of(&f.poll()), ["caf"]);
        append(&log, line(2007, b"\xA9!").as_bytes());
        assert_eq!(texts_of(&f.poll()), ["é!"]);

        // Two rotations within one poll: the file in between is gone, the rest comes.
        append(&log, line(2008, b"h").as_bytes());
        std::fs::rename(&log, &rotated).unwrap();
        append(&log, line(2009, b"i").as_bytes());
        std::fs::rename(&log, &rotated).unwrap();
        append(&log, line(2010, b"j").as_bytes());
        // The file freed by the second rotation may lend its inode to the newest one, so
        // "i" may be missed too; what comes is new, once, and ends with "j".
        let got = f.poll();
        assert_eq!(got.last().map(|e| e.text.as_str()), Some("j"));
        assert!(texts_of(&got).iter().all(|t| ["i", "j"].contains(t)), "{:?}", texts_of(&got));

        // A restart truncates the console log: it is read again from its start.
        std::fs::write(&console, "new boot\n").unwrap();
        assert_eq!(texts_of(&f.poll()), ["new boot"]);
    }

    #[test]
    fn follower_applies_the_query_and_a_missing_log_appears_later() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("logs.jsonl");
        let q = LogQuery { sources: vec!["stderr".into()], since_ms: Some(5), ..Default::default() };
        let (mut f, history) = LogFollower::start(d.path(), &q).unwrap();
        assert!(history.is_empty());
        std::fs::write(d.path().join("console.log"), "boot\n").unwrap();
        append(&log, output_line(1, "stderr", 1, 1, b"early").as_bytes());
        append(&log, output_line(6, "stdout", 1, 1, b"out").as_bytes());
        append(&log, output_line(7, "stderr", 1, 1, b"err").as_bytes());
        assert_eq!(texts_of(&f.poll()), ["err"]);
        assert!(LogFollower::start(d.path(), &LogQuery { sources: vec!["bogus".into()], ..Default::default() }).is_err());
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
