//! Bounds the tar metadata a layer can make the host hold in memory.
//!
//! The `tar` crate reads each extension entry — PAX headers (`x`, `g`) and GNU long names
//! (`L`, `K`) — wholly into memory before the entry it describes, whatever size its header
//! claims. A hostile layer could declare a multi-gigabyte PAX header (a few megabytes once
//! compressed). [`TarGuard`] sits between the decompressor and `tar::Archive`, follows the
//! archive's block structure as the bytes pass, and fails the read as soon as an extension
//! entry declares more than [`MAX_EXTENSION_BYTES`].
//!
//! It also hands the raw PAX records of the current entry to the layer applier
//! ([`TarGuard::pax`]): the `tar` crate splits records at every newline, which breaks binary
//! values such as `security.capability`, so [`pax_records`] parses them by their length
//! prefix instead. The guard reads in lock-step with the `tar` crate (which reads headers
//! and extension data exactly), so when an entry is handed out, the records the guard
//! saw last belong to it.
//!
//! It mirrors how the `tar` crate walks an archive: a 512-byte header, then old-GNU sparse
//! extension blocks while their `isextended` flag is set, then the entry's data rounded up to
//! 512 bytes; the data size is the header's size field (octal or base-256), or the `size`
//! record of a preceding PAX `x` header for the next non-extension entry. If the guard ever
//! lost track, it would misread data as a header; a misread header fails the `tar` crate's
//! checksum anyway, so a desync can only turn into an error, never into a bypass of
//! anything but this memory bound.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

/// Largest PAX header or GNU long name/link entry accepted (data bytes).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

const BLOCK: u64 = 512;

enum State {
    /// Collecting a header block.
    Header { buf: Box<[u8; 512]>, fill: usize },
    /// Passing old-GNU sparse extension blocks (`left` bytes of the current block).
    SparseExt { buf: Box<[u8; 512]>, fill: usize, data: u64 },
    /// Passing `left` bytes of entry data and padding; `pax` collects a PAX `x` entry.
    Data { left: u64, pax: Option<Vec<u8>>, pax_len: u64 },
}

/// The PAX data of the entry whose header the guard saw last (see the module docs).
#[derive(Clone, Default)]
pub struct CurrentPax(Rc<RefCell<Option<Vec<u8>>>>);

impl CurrentPax {
    /// The raw records (`"<len> <key>=<value>\n"`…), if the entry had a PAX header.
    pub fn get(&self) -> Option<Vec<u8>> {
        self.0.borrow().clone()
    }
}

/// A reader that enforces [`MAX_EXTENSION_BYTES`] on the tar stream it passes through.
pub struct TarGuard<R> {
    inner: R,
    state: State,
    /// `size` from the last PAX `x` header, for the next non-extension entry.
    pax_size: Option<u64>,
    /// Data of the last PAX `x` header, for the next non-extension entry.
    pax_pending: Option<Vec<u8>>,
    current: CurrentPax,
    failed: Option<String>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> TarGuard<R> {
        TarGuard { inner, state: header_state(), pax_size: None, pax_pending: None, current: CurrentPax::default(), failed: None }
    }

    /// A handle on the PAX records of the entry the archive is at.
    pub fn pax(&self) -> CurrentPax {
        self.current.clone()
    }

    /// The wrapped reader (to drain what the archive did not read).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn fail(&mut self, why: String) -> io::Error {
        self.failed = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Advances the state machine over `bytes`, which the caller is about to return.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header { buf, fill } => {
                    let n = (512 - *fill).min(bytes.len());
                    buf[*fill..*fill + n].copy_from_slice(&bytes[..n]);
                    *fill += n;
                    bytes = &bytes[n..];
                    if *fill == 512 {
                        let header = std::mem::replace(buf, Box::new([0; 512]));
                        self.on_header(&header)?;
                    }
                }
                State::SparseExt { buf, fill, data } => {
                    let n = (512 - *fill).min(bytes.len());
                    buf[*fill..*fill + n].copy_from_slice(&bytes[..n]);
                    *fill += n;
                    bytes = &bytes[n..];
                    if *fill == 512 {
                        let data = *data;
                        self.state = if buf[504] != 0 {
                            State::SparseExt { buf: Box::new([0; 512]), fill: 0, data }
                        } else {
                            data_state(data, false)
                        };
                    }
                }
                State::Data { left, pax, pax_len } => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    if let Some(p) = pax.as_mut() {
                        let want = (*pax_len as usize).saturating_sub(p.len()).min(n);
                        p.extend_from_slice(&bytes[..want]);
                    }
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        if let Some(p) = pax.take() {
                            self.pax_size = tar_crate_pax_size(&p);
                            self.pax_pending = Some(p);
                        }
                        self.state = header_state();
                    }
                }
            }
        }
        Ok(())
    }

    fn on_header(&mut self, h: &[u8; 512]) -> io::Result<()> {
        if h.iter().all(|b| *b == 0) {
            self.state = header_state(); // end-of-archive marker (or padding after it)
            return Ok(());
        }
        let typeflag = h[156];
        let mut size = parse_size(&h[124..136]).ok_or_else(|| self.fail("a tar header has an invalid size field".into()))?;
        let is_extension = matches!(typeflag, b'x' | b'g' | b'L' | b'K');
        if is_extension {
            if size > MAX_EXTENSION_BYTES {
                let what = if matches!(typeflag, b'x' | b'g') { "PAX header" } else { "GNU long name" };
                return Err(self.fail(format!(
                    "a {what} entry declares {size} bytes (at most {MAX_EXTENSION_BYTES} are accepted)"
                )));
            }
        } else {
            if let Some(s) = self.pax_size.take() {
                size = s;
            }
            *self.current.0.borrow_mut() = self.pax_pending.take();
        }
        // Old-GNU sparse files keep extension blocks of sparse map between header and data.
        if typeflag == b'S' && h[482] != 0 {
            self.state = State::SparseExt { buf: Box::new([0; 512]), fill: 0, data: size };
        } else {
            self.state = data_state(size, typeflag == b'x');
        }
        if let State::Data { left: 0, .. } = self.state {
            self.state = header_state();
        }
        Ok(())
    }
}

fn header_state() -> State {
    State::Header { buf: Box::new([0; 512]), fill: 0 }
}

fn data_state(size: u64, pax: bool) -> State {
    let padded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
    State::Data { left: padded, pax: pax.then(Vec::new), pax_len: size }
}

/// Octal (NUL/space terminated) or GNU base-256 size field.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(v);
    }
    let s = field.iter().take_while(|b| **b != 0).copied().collect::<Vec<u8>>();
    let s = std::str::from_utf8(&s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `size` record exactly as the `tar` crate reads it (records split at newlines, the
/// first malformed one ends the search), so both walk the archive alike.
fn tar_crate_pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key_bytes() == b"size" {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

/// PAX records (`"<len> <key>=<value>\n"`) split by their length prefix, so values may hold
/// any byte. Parsing stops at the first malformed record.
pub fn pax_records(data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().take(20).position(|b| *b == b' ') else { break };
        let Some(len) = std::str::from_utf8(&rest[..sp]).ok().and_then(|l| l.parse::<usize>().ok()) else { break };
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            break;
        }
        let record = &rest[sp + 1..len - 1];
        let Some(eq) = record.iter().position(|b| *b == b'=') else { break };
        out.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    out
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(tar: &[u8]) -> io::Result<Vec<(Vec<u8>, u64)>> {
        let mut a = tar::Archive::new(TarGuard::new(tar));
        let mut out = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((e.path_bytes().into_owned(), data.len() as u64));
        }
        Ok(out)
    }

    #[test]
    fn passes_ordinary_archives_with_pax_and_long_names() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(120) + "file";
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap(); // GNU long name
        b.append_pax_extensions([("SCHILY.xattr.user.a", &b"1"[..]), ("path", &b"p/ax"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(700);
        h.set_mode(0o644);
        h.set_path("ignored").unwrap();
        h.set_cksum();
        b.append(&h, &[7u8; 700][..]).unwrap();
        let tar = b.into_inner().unwrap();
        let entries = read_all(&tar).unwrap();
        assert_eq!(entries, vec![(long.into_bytes(), 3), (b"p/ax".to_vec(), 700)]);
    }

    #[test]
    fn pax_size_override_is_followed() {
        // The real size lives in the PAX record; the ustar field says 0.
        let raw = |name: &str, t: u8, size: u64, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_entry_type(tar::EntryType::new(t));
            h.set_size(size);
            h.set_cksum();
            let mut v = h.as_bytes().to_vec();
            v.extend_from_slice(data);
            v.resize(v.len().div_ceil(512) * 512, 0);
            v
        };
        let mut tar = raw("PaxHeader", b'x', 13, b"13 size=1000\n");
        tar.extend(raw("big", b'0', 0, &[1u8; 1000]));
        tar.extend(raw("next", b'0', 2, b"hi"));
        tar.extend([0u8; 1024]);
        let entries = read_all(&tar).unwrap();
        assert_eq!(entries, vec![(b"big".to_vec(), 1000), (b"next".to_vec(), 2)]);
    }

    #[test]
    fn pax_records_keep_binary_values_and_reach_their_entry() {
        let value: &[u8] = b"a\nb=c\0d";
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.user.bin", value), ("uid", &b"7"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_path("f").unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_path("g").unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        let guard = TarGuard::new(&tar[..]);
        let pax = guard.pax();
        let mut a = tar::Archive::new(guard);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let recs = pax.get().map(|d| pax_records(&d).into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect::<Vec<_>>());
            seen.push((e.path_bytes().into_owned(), recs));
        }
        assert_eq!(
            seen,
            vec![
                (b"f".to_vec(), Some(vec![(b"SCHILY.xattr.user.bin".to_vec(), value.to_vec()), (b"uid".to_vec(), b"7".to_vec())])),
                (b"g".to_vec(), None),
            ]
        );
        assert!(pax_records(b"99 truncated=x\n").is_empty());
    }

    #[test]
    fn huge_extension_headers_are_refused_before_they_are_read() {
        for t in [b'x', b'L'] {
            let mut h = tar::Header::new_ustar();
            h.set_path("PaxHeader").unwrap();
            h.set_entry_type(tar::EntryType::new(t));
            h.set_size(8 << 30); // claims 8 GiB
            h.set_cksum();
            let mut tar = h.as_bytes().to_vec();
            tar.extend_from_slice(&[b'a'; 4096]);
            let err = read_all(&tar).unwrap_err();
            assert!(err.to_string().contains("at most"), "{err}");
        }
    }
}
