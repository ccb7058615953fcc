//! The sandbox log: every session's stdout and stderr, as JSON lines in
//! `<sandbox>/logs.jsonl` with the raw bytes and the session id (format and decoding:
//! `microsandbox::sandbox::logs`).
//!
//! Written by one task fed through a bounded queue: relaying output never waits for the
//! log. Under a flood the queue fills and entries are dropped (counted in a marker line)
//! rather than slowing the guest's sessions down. The file rotates at [`MAX_LOG_BYTES`]
//! to `logs.jsonl.1`, so the log never grows without bound.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use microsandbox::sandbox::logs;
use tokio::sync::mpsc;

pub const LOG_FILE: &str = "logs.jsonl";
pub const MAX_LOG_BYTES: u64 = 8 << 20;
const QUEUE: usize = 1024;

struct Entry {
    at_ms: u64,
    source: &'static str,
    /// The guest session that wrote `bytes`; `None` for the supervisor's own messages.
    session: Option<u32>,
    bytes: Vec<u8>,
}

/// Cheap to clone; `record` never blocks.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl LogSink {
    /// Starts the writer task for `dir`.
    pub fn spawn(dir: PathBuf) -> LogSink {
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        // Session ids restart with every boot: the boot's start time tells streams apart.
        let boot_ms = now_ms();
        tokio::task::spawn_blocking(move || {
            let path = dir.join(LOG_FILE);
            let open = |p: &PathBuf| std::fs::OpenOptions::new().create(true).append(true).open(p).ok();
            let mut file = open(&path);
            let mut size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            while let Some(e) = rx.blocking_recv() {
                let mut line = String::new();
                let n = lost.swap(0, Ordering::Relaxed);
                if n > 0 {
                    let why = format!("[{n} log entries dropped: output arrived faster than the log could keep]");
                    line.push_str(&logs::text_line(e.at_ms, "system", &why));
                }
                line.push_str(&match e.session {
                    Some(id) => logs::output_line(e.at_ms, e.source, boot_ms, id, &e.bytes),
                    None => logs::text_line(e.at_ms, e.source, &String::from_utf8_lossy(&e.bytes)),
                });
                if size + line.len() as u64 > MAX_LOG_BYTES {
                    let _ = std::fs::rename(&path, dir.join(format!("{LOG_FILE}.1")));
                    file = open(&path);
                    size = 0;
                }
                if let Some(f) = file.as_mut() {
                    if f.write_all(line.as_bytes()).is_ok() {
                        size += line.len() as u64;
                    }
                }
            }
        });
        LogSink { tx, dropped }
    }

    /// Queues `bytes` that `session` wrote to `source` ("stdout"/"stderr"), or a message of
    /// the supervisor's own (`session` `None`, UTF-8); drops it if the queue is full.
    pub fn record(&self, source: &'static str, session: Option<u32>, bytes: &[u8]) {
        let e = Entry { at_ms: now_ms(), source, session, bytes: bytes.to_vec() };
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
