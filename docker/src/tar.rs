//! A minimal in-memory `ustar` writer, just enough for a Docker build context.
//!
//! The Docker build API takes the build context as a tar stream. We only ever
//! send a handful of small regular files with short names, so instead of a
//! dependency we write the format directly (POSIX.1-1988 "ustar"):
//!
//! * each file is a 512-byte header followed by its data, zero-padded to a
//!   multiple of 512 bytes;
//! * the archive ends with two all-zero 512-byte blocks.
//!
//! Numeric header fields are NUL-terminated octal ASCII. The checksum is the
//! sum of all header bytes computed with the checksum field itself filled with
//! spaces. Timestamps are fixed at 0 and owners at root so the archive (and
//! the image layer built from it) is a pure function of the file contents.

/// A tar block.
pub const BLOCK: usize = 512;

/// Builds a tar archive in memory.
#[derive(Debug, Default)]
pub(crate) struct TarBuilder {
    buf: Vec<u8>,
}

/// Why a file could not be added.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar entry name `{0}` is empty or longer than 100 bytes")]
    BadName(String),
    #[error("tar entry `{0}` is too large for a ustar header")]
    TooLarge(String),
}

impl TarBuilder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends a regular file `name` (a relative path, at most 100 bytes)
    /// with permission bits `mode` (e.g. `0o755`).
    pub(crate) fn add_file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), TarError> {
        self.add_entry(name, b'0', mode, data)
    }

    /// Appends an empty directory `name` (a relative path, at most 99 bytes;
    /// the trailing `/` is added) with permission bits `mode`.
    pub(crate) fn add_dir(&mut self, name: &str, mode: u32) -> Result<(), TarError> {
        let name = name.trim_end_matches('/');
        if name.is_empty() {
            return Err(TarError::BadName(name.to_string()));
        }
        self.add_entry(&format!("{name}/"), b'5', mode, &[])
    }

    fn add_entry(
        &mut self,
        name: &str,
        typeflag: u8,
        mode: u32,
        data: &[u8],
    ) -> Result<(), TarError> {
        // 11 octal digits hold sizes below 8 GiB; an in-memory archive
        // never needs more.
        if data.len() as u64 >= 1u64 << 33 {
            return Err(TarError::TooLarge(name.to_string()));
        }
        let h = header(name, typeflag, mode, data.len() as u64)?;
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        self.buf
            .resize(self.buf.len() + padding(data.len() as u64), 0);
        Ok(())
    }

    /// Appends the end-of-archive marker and returns the bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.buf.resize(self.buf.len() + 2 * BLOCK, 0);
        self.buf
    }
}

/// The 512-byte header of a regular file (`typeflag` `b'0'`) or directory
/// (`b'5'`) entry `name` (at most 100 bytes) of `size` bytes. Sizes of
/// 8 GiB and more use the base-256 form GNU tar and Go's `archive/tar`
/// (so Docker) read. For streaming an archive: write the header, the
/// `size` bytes, then [`padding`] zero bytes; end with [`END`].
pub fn header(name: &str, typeflag: u8, mode: u32, size: u64) -> Result<[u8; BLOCK], TarError> {
    if name.is_empty() || name.len() > 100 {
        return Err(TarError::BadName(name.to_string()));
    }
    let mut h = [0u8; BLOCK];
    h[0..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode & 0o7777)); // mode
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    if size < 1u64 << 33 {
        octal(&mut h[124..136], size);
    } else {
        // Base-256: a set high bit, then the size big-endian.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], 0); // mtime
    h[156] = typeflag; // '0' regular file, '5' directory
    h[257..263].copy_from_slice(b"ustar\0"); // magic
    h[263..265].copy_from_slice(b"00"); // version
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    // Checksum: computed with the field set to spaces, then written as
    // six octal digits, NUL, space.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    Ok(h)
}

/// Zero bytes that follow an entry of `size` bytes.
pub fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// The end-of-archive marker: two zero blocks.
pub const END: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

/// Writes `value` as zero-padded octal filling `field` except its last byte,
/// which is NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_checksum() -> Result<(), TarError> {
        let mut t = TarBuilder::new();
        t.add_file("hello.txt", 0o644, b"hi\n")?;
        t.add_file("bin/x", 0o755, &[7u8; 600])?;
        let bytes = t.finish();
        // header + 1 data block, header + 2 data blocks, 2 end blocks
        assert_eq!(bytes.len(), 512 * (2 + 3 + 2));
        assert_eq!(&bytes[0..9], b"hello.txt");
        assert_eq!(&bytes[100..108], b"0000644\0");
        assert_eq!(&bytes[124..136], b"00000000003\0");
        assert_eq!(&bytes[512..515], b"hi\n");
        assert_eq!(&bytes[1024 + 100..1024 + 108], b"0000755\0");
        assert_eq!(&bytes[1024 + 124..1024 + 136], b"00000001130\0"); // 600
        // Recompute the first header's checksum independently.
        let mut h = [0u8; 512];
        h.copy_from_slice(&bytes[..512]);
        let stored = std::str::from_utf8(&h[148..154]).map(|s| u32::from_str_radix(s, 8));
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        assert!(matches!(stored, Ok(Ok(v)) if v == sum));
        assert!(bytes[bytes.len() - 1024..].iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn huge_sizes_use_base_256() {
        let h = header("big.tar", b'0', 0o644, 9 << 30).unwrap();
        assert_eq!(h[124], 0x80);
        assert_eq!(u64::from_be_bytes(h[128..136].try_into().unwrap()), 9 << 30);
        let small = header("s", b'0', 0o644, 5).unwrap();
        assert_eq!(&small[124..136], b"00000000005\0");
        assert_eq!(padding(5), 507);
        assert_eq!(padding(1024), 0);
        assert!(header(&"n".repeat(101), b'0', 0, 0).is_err());
    }

    #[test]
    fn directories_have_their_own_type() -> Result<(), TarError> {
        let mut t = TarBuilder::new();
        t.add_dir("vol", 0o777)?;
        let bytes = t.finish();
        assert_eq!(bytes.len(), 512 * 3, "a header and no data");
        assert_eq!(&bytes[0..4], b"vol/");
        assert_eq!(bytes[156], b'5');
        assert_eq!(&bytes[100..108], b"0000777\0");
        assert_eq!(&bytes[124..136], b"00000000000\0");
        assert!(TarBuilder::new().add_dir("/", 0o755).is_err());
        Ok(())
    }

    #[test]
    fn rejects_long_names() {
        let mut t = TarBuilder::new();
        assert!(t.add_file(&"a".repeat(101), 0o644, b"").is_err());
        assert!(t.add_file("", 0o644, b"").is_err());
    }
}
