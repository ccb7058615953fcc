//! Turns Debian's `vmlinuz` (a bzImage) into the uncompressed ELF `vmlinux`.
//!
//! QEMU boots an ELF kernel through its PVH entry point and skips the in-guest
//! decompressor, which is about a second faster under TCG. Debian compresses the
//! payload with LZ4 in the *legacy* frame format, which no maintained crate decodes as
//! a stream, so the frame walk is here; each block is decoded by `lz4_flex`.

use crate::error::{Error, Result};

/// Offsets in the x86 boot protocol header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Legacy LZ4 blocks decompress to at most 8 MiB each.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Refuse to inflate beyond this; a real kernel is far smaller.
const MAX_VMLINUX: usize = 512 << 20;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Extracts the ELF kernel from a bzImage whose payload is legacy-LZ4 compressed.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::Runtime(format!("cannot extract vmlinux from the kernel image: {why}"));
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err(bad("not a bzImage (no HdrS header)"));
    }
    let sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let setup_len = (sects + 1) * 512;
    let off = u32_at(bzimage, PAYLOAD_OFFSET).ok_or_else(|| bad("short header"))? as usize;
    let len = u32_at(bzimage, PAYLOAD_LENGTH).ok_or_else(|| bad("short header"))? as usize;
    let start = setup_len.checked_add(off).ok_or_else(|| bad("payload offset overflows"))?;
    let payload = bzimage
        .get(start..start.saturating_add(len))
        .ok_or_else(|| bad("payload lies outside the file"))?;
    let elf = decode_lz4_legacy(payload).ok_or_else(|| bad("payload is not legacy-LZ4"))?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(bad("decompressed payload is not an ELF file"));
    }
    Ok(elf)
}

/// Decodes concatenated legacy-LZ4 frames. Trailing bytes that do not form a block
/// (the kernel build appends the uncompressed size) end the stream.
fn decode_lz4_legacy(mut input: &[u8]) -> Option<Vec<u8>> {
    if u32_at(input, 0)? != LZ4_LEGACY_MAGIC {
        return None;
    }
    input = &input[4..];
    let mut out = Vec::new();
    while let Some(size) = u32_at(input, 0) {
        input = &input[4..];
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = size as usize;
        if size == 0 || size > input.len() {
            break;
        }
        let block = lz4_flex::block::decompress(&input[..size], LZ4_LEGACY_BLOCK).ok()?;
        out.extend_from_slice(&block);
        if out.len() > MAX_VMLINUX {
            return None;
        }
        input = &input[size..];
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_bzimage() {
        assert!(extract_vmlinux(b"hello").is_err());
        assert!(extract_vmlinux(&vec![0u8; 4096]).is_err());
    }

    #[test]
    fn decodes_legacy_frames() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let block = lz4_flex::block::compress(&data);
        let mut framed = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        framed.extend_from_slice(&(block.len() as u32).to_le_bytes());
        framed.extend_from_slice(&block);
        framed.extend_from_slice(&1234u32.to_le_bytes()); // appended size, not a block
        assert_eq!(decode_lz4_legacy(&framed).unwrap(), data);
    }

    /// Runs against a real Debian kernel when one is unpacked at MSB_TEST_VMLINUZ.
    #[test]
    fn real_kernel_when_available() {
        let Some(path) = std::env::var_os("MSB_TEST_VMLINUZ") else { return };
        let img = std::fs::read(path).unwrap();
        let elf = extract_vmlinux(&img).unwrap();
        assert!(elf.len() > 10 << 20);
    }
}
