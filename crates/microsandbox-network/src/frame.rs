//! QEMU's `-netdev stream` framing: each Ethernet frame travels as a 4-byte big-endian
//! length followed by the frame (no virtio-net header: QEMU strips checksum and
//! segmentation offloads for this back-end, so frames are complete and checksummed).
//!
//! Pure code, no I/O: bytes go in, frames come out. The guest controls every byte
//! (through QEMU), so the decoder is bounded: it holds at most one frame of
//! [`MAX_STREAM_FRAME`] bytes, and a length QEMU itself could never send ends the link.

/// QEMU's `NET_BUFSIZE` (4096 + 65536): QEMU never sends a longer frame and drops the link
/// when it receives one.
pub const MAX_STREAM_FRAME: usize = 4096 + 65536;
/// Smallest frame worth looking at: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// What [`Decoder::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete frame within the size limit.
    Frame(Vec<u8>),
    /// A frame that was skipped whole: shorter than an Ethernet header or longer than the
    /// configured maximum (the stream stays in sync; the caller counts it).
    Dropped(usize),
}

/// The stream is unusable: a length of 0 or above [`MAX_STREAM_FRAME`]. Nothing after it
/// can be trusted to be in sync, so the caller closes the link.
#[derive(Debug, PartialEq, Eq)]
pub struct Desync(pub u32);

impl std::fmt::Display for Desync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frame length {} on the NIC stream is impossible (0 or over {MAX_STREAM_FRAME})", self.0)
    }
}

/// Incremental decoder. Feed it whatever `read` returned; prefixes and frames may be split
/// anywhere across calls.
#[derive(Debug)]
pub struct Decoder {
    max_frame: usize,
    header: [u8; 4],
    header_len: usize,
    /// Length of the frame being read (after a complete header).
    want: Option<usize>,
    /// Bytes of the current frame; empty while skipping an oversized one.
    buf: Vec<u8>,
    /// Bytes of the current frame consumed so far (kept or skipped).
    got: usize,
}

impl Decoder {
    /// `max_frame`: the largest frame to deliver (MTU + Ethernet header, maybe a VLAN tag);
    /// longer ones are skipped.
    pub fn new(max_frame: usize) -> Self {
        Decoder { max_frame: max_frame.min(MAX_STREAM_FRAME), header: [0; 4], header_len: 0, want: None, buf: Vec::new(), got: 0 }
    }

    /// Consumes `input`, calling `out` for every frame completed by it.
    pub fn push(&mut self, mut input: &[u8], mut out: impl FnMut(Decoded)) -> Result<(), Desync> {
        while !input.is_empty() {
            let Some(want) = self.want else {
                let n = (4 - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                self.header_len += n;
                input = &input[n..];
                if self.header_len == 4 {
                    let len = u32::from_be_bytes(self.header);
                    if len == 0 || len as usize > MAX_STREAM_FRAME {
                        return Err(Desync(len));
                    }
                    self.header_len = 0;
                    self.want = Some(len as usize);
                    self.got = 0;
                    self.buf.clear();
                }
                continue;
            };
            let keep = (MIN_FRAME..=self.max_frame).contains(&want);
            let n = (want - self.got).min(input.len());
            if keep {
                self.buf.extend_from_slice(&input[..n]);
            }
            self.got += n;
            input = &input[n..];
            if self.got == want {
                self.want = None;
                out(if keep { Decoded::Frame(std::mem::take(&mut self.buf)) } else { Decoded::Dropped(want) });
            }
        }
        Ok(())
    }
}

/// Appends `frame` with its length prefix to `out`.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    debug_assert!(frame.len() <= MAX_STREAM_FRAME);
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder, input: &[u8]) -> Result<Vec<Decoded>, Desync> {
        let mut v = Vec::new();
        d.push(input, |f| v.push(f))?;
        Ok(v)
    }

    #[test]
    fn round_trip_split_anywhere() {
        let a = vec![1u8; 60];
        let b = vec![2u8; 1514];
        let mut wire = Vec::new();
        encode(&a, &mut wire);
        encode(&b, &mut wire);
        for split in 0..wire.len() {
            let mut d = Decoder::new(1514);
            let mut got = frames(&mut d, &wire[..split]).unwrap();
            got.extend(frames(&mut d, &wire[split..]).unwrap());
            assert_eq!(got, vec![Decoded::Frame(a.clone()), Decoded::Frame(b.clone())], "split at {split}");
        }
        // One byte at a time (a trickling peer).
        let mut d = Decoder::new(1514);
        let mut got = Vec::new();
        for byte in &wire {
            got.extend(frames(&mut d, std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn short_and_oversized_frames_are_skipped_in_sync() {
        let mut wire = Vec::new();
        encode(&[9u8; 13], &mut wire);
        encode(&[7u8; 2000], &mut wire);
        encode(&[5u8; 64], &mut wire);
        let mut d = Decoder::new(1514);
        let got = frames(&mut d, &wire).unwrap();
        assert_eq!(got, vec![Decoded::Dropped(13), Decoded::Dropped(2000), Decoded::Frame(vec![5u8; 64])]);
        assert!(d.buf.capacity() <= 1514, "an oversized frame is never buffered");
    }

    #[test]
    fn impossible_lengths_desync() {
        let mut d = Decoder::new(1514);
        assert_eq!(frames(&mut d, &[0, 0, 0, 0]), Err(Desync(0)));
        let mut d = Decoder::new(1514);
        let len = (MAX_STREAM_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(frames(&mut d, &len), Err(Desync(MAX_STREAM_FRAME as u32 + 1)));
        let mut d = Decoder::new(1514);
        assert_eq!(frames(&mut d, &[0xff, 0xff, 0xff, 0xff]), Err(Desync(u32::MAX)));
    }
}
