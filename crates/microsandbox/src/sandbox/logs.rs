//! Reading a sandbox's logs: session output recorded by its supervisor
//! (`logs.jsonl`, rotated to `logs.jsonl.1`) and the guest console (`console.log`,
//! source `system`). Works for stopped sandboxes too. Every read is bounded.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Sources a caller may ask for.
pub const SOURCES: &[&str] = &["stdout", "stderr", "system"];
/// At most this many bytes are read from each log file (its end).
const MAX_READ: u64 = 4 << 20;

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEntry {
    pub source: String,
    pub text: String,
    /// Unix milliseconds; `None` for console lines, which carry no wall-clock time.
    pub timestamp_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Line {
    t: u64,
    source: String,
    text: String,
}

/// The last `MAX_READ` bytes of `path`, starting at a line boundary.
fn tail_of(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_READ);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX_READ).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        text.split_once('\n').map(|(_, rest)| rest.to_string()).unwrap_or_default()
    } else {
        text
    }
}

/// The last `tail` entries of `dir`'s logs from `sources` (all when empty).
pub fn read(dir: &Path, tail: usize, sources: &[String]) -> Result<Vec<LogEntry>> {
    if let Some(bad) = sources.iter().find(|s| !SOURCES.contains(&s.as_str())) {
        return Err(Error::InvalidConfig(format!("unknown log source {bad:?}; use \"stdout\", \"stderr\" or \"system\"")));
    }
    let want = |s: &str| sources.is_empty() || sources.iter().any(|x| x == s);
    let mut out = Vec::new();
    if want("system") {
        for l in tail_of(&dir.join("console.log")).lines().filter(|l| !l.trim().is_empty()) {
            out.push(LogEntry { source: "system".into(), text: l.to_string(), timestamp_ms: None });
        }
    }
    for file in ["logs.jsonl.1", "logs.jsonl"] {
        for l in tail_of(&dir.join(file)).lines() {
            // The file is ours, but a line cut by a crash must not fail the whole read.
            let Ok(line) = serde_json::from_str::<Line>(l) else { continue };
            if want(&line.source) {
                out.push(LogEntry { source: line.source, text: line.text, timestamp_ms: Some(line.t) });
            }
        }
    }
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
        let err = read(d.path(), 100, &["stderr".into()]).unwrap();
        assert_eq!(err.len(), 1);
        assert_eq!(read(d.path(), 1, &[]).unwrap()[0].text, "b");
        assert!(read(d.path(), 1, &["bogus".into()]).is_err());
    }
}
