//! Decompresses a layer blob on its own thread, so inflating and hashing overlap the
//! unpacking of files (what `gzip -d | tar -x` gets from two processes).
//!
//! The decoder thread reads the blob, picks the decompressor by magic bytes, hashes the
//! uncompressed stream (the layer's `diff_id`) and sends it in chunks over a bounded channel
//! (at most [`QUEUE`] × [`CHUNK`] bytes in flight). It always decodes to the end, even after
//! the reader went away, so the `diff_id` and any decoder error describe the whole blob.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

const CHUNK: usize = 256 << 10;
const QUEUE: usize = 8;

/// Which decompressor a blob needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Detects compression from the first bytes (magic numbers beat media types, which lie).
pub fn detect_compression(head: &[u8], media_type: &str) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.len() >= 4 {
        Compression::None
    } else if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
        Compression::Zstd
    } else if media_type.ends_with("gzip") {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// What the decoder thread saw of the whole blob.
#[derive(Debug)]
pub struct Decoded {
    /// `sha256:<hex>` of everything the decompressor produced.
    pub diff_id: String,
    /// Why decompression stopped early, if it did.
    pub error: Option<io::Error>,
}

/// The uncompressed stream, as sent by the decoder thread. EOF when the thread is done.
pub struct ChanReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // sender finished (or failed: see Decoded::error)
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Starts decoding `file` on a new thread. Drop the reader to let the thread finish
/// without sending, then join the handle for the [`Decoded`] summary.
pub fn spawn(file: File, media_type: &str) -> io::Result<(ChanReader, JoinHandle<Decoded>)> {
    let (tx, rx) = sync_channel(QUEUE);
    let media_type = media_type.to_string();
    let handle = std::thread::Builder::new().name("msb-layer-decode".into()).spawn(move || decode(file, &media_type, tx))?;
    Ok((ChanReader { rx, buf: Vec::new(), pos: 0 }, handle))
}

fn decode(file: File, media_type: &str, tx: SyncSender<Vec<u8>>) -> Decoded {
    let mut diff = Sha256::new();
    let error = (|| -> io::Result<()> {
        let mut buffered = BufReader::with_capacity(CHUNK, file);
        let head = buffered.fill_buf()?.to_vec();
        let mut decoder: Box<dyn Read> = match detect_compression(&head, media_type) {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
            Compression::None => Box::new(buffered),
        };
        let mut listening = true;
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match decoder.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                return Ok(());
            }
            chunk.truncate(filled);
            diff.update(&chunk);
            // A reader that stopped (error or end of archive) no longer listens; keep decoding.
            listening = listening && tx.send(chunk).is_ok();
        }
    })()
    .err();
    Decoded { diff_id: format!("sha256:{}", hex::encode(diff.finalize())), error }
}

/// `sha256:<hex>` of a file's content.
pub fn sha256_file(path: &std::path::Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
