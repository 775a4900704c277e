//! A streaming ZIP writer: stored (uncompressed) entries with data
//! descriptors, so an archive is written front to back into any `Write`
//! without seeking, in constant memory; ZIP64 records when an entry, an
//! offset or the entry count outgrows the classic format.
//!
//! Invariant: memory held is one small record per finished entry (name,
//! CRC, size, offset) for the central directory; file bytes pass through.

use std::io::{self, Write};

const LOCAL_SIG: u32 = 0x0403_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
/// Bit 3: sizes and CRC follow the data; bit 11: names are UTF-8.
const FLAGS: u16 = 0x0008 | 0x0800;
const U32_MAX: u64 = 0xFFFF_FFFF;

struct Entry {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
    zip64: bool,
    /// MS-DOS time and date.
    dos: (u16, u16),
}

pub struct ZipWriter<W: Write> {
    out: W,
    /// Entries of at least this size get ZIP64 headers (lowered by tests,
    /// which also get ZIP64 end records then).
    zip64_from: u64,
    /// Bytes written so far (offsets of headers).
    pos: u64,
    entries: Vec<Entry>,
    current: Option<(Entry, flate2::Crc)>,
}

fn dos_time(unix_secs: i64) -> (u16, u16) {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix_secs) else {
        return (0, 0x21);
    };
    if t.year() < 1980 {
        return (0, 0x21); // 1980-01-01
    }
    let time = ((t.hour() as u16) << 11) | ((t.minute() as u16) << 5) | (t.second() as u16 / 2);
    let date = (((t.year() - 1980) as u16) << 9) | ((t.month() as u16) << 5) | t.day() as u16;
    (time, date)
}

impl<W: Write> ZipWriter<W> {
    pub fn new(out: W) -> ZipWriter<W> {
        ZipWriter {
            out,
            zip64_from: U32_MAX,
            pos: 0,
            entries: Vec::new(),
            current: None,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Starts an entry of `size` bytes (known in advance, so ZIP64 is
    /// chosen up front) modified at `mtime` (Unix seconds).
    pub fn start_entry(&mut self, name: &str, size: u64, mtime: i64) -> io::Result<()> {
        if self.current.is_some() {
            self.finish_entry()?;
        }
        let zip64 = size >= self.zip64_from;
        let entry = Entry {
            name: name.to_owned(),
            crc: 0,
            size: 0,
            offset: self.pos,
            zip64,
            dos: dos_time(mtime),
        };
        let mut h = Vec::with_capacity(30 + name.len() + 20);
        h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        h.extend_from_slice(&(if zip64 { 45u16 } else { 20u16 }).to_le_bytes());
        h.extend_from_slice(&FLAGS.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&entry.dos.0.to_le_bytes());
        h.extend_from_slice(&entry.dos.1.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // crc: in the descriptor
        let size_field: u32 = if zip64 { 0xFFFF_FFFF } else { 0 };
        h.extend_from_slice(&size_field.to_le_bytes());
        h.extend_from_slice(&size_field.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(if zip64 { 20u16 } else { 0u16 }).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        if zip64 {
            h.extend_from_slice(&1u16.to_le_bytes());
            h.extend_from_slice(&16u16.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes());
        }
        self.put(&h)?;
        self.current = Some((entry, flate2::Crc::new()));
        Ok(())
    }

    /// Appends bytes to the current entry.
    pub fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        let Some((entry, crc)) = self.current.as_mut() else {
            return Err(io::Error::other("zip: data outside an entry"));
        };
        crc.update(data);
        entry.size += data.len() as u64;
        if entry.size >= U32_MAX && !entry.zip64 {
            return Err(io::Error::other("zip: entry is larger than announced"));
        }
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn finish_entry(&mut self) -> io::Result<()> {
        let Some((mut entry, crc)) = self.current.take() else {
            return Ok(());
        };
        entry.crc = crc.sum();
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
        d.extend_from_slice(&entry.crc.to_le_bytes());
        if entry.zip64 {
            d.extend_from_slice(&entry.size.to_le_bytes());
            d.extend_from_slice(&entry.size.to_le_bytes());
        } else {
            d.extend_from_slice(&(entry.size as u32).to_le_bytes());
            d.extend_from_slice(&(entry.size as u32).to_le_bytes());
        }
        self.put(&d)?;
        self.entries.push(entry);
        Ok(())
    }

    /// The sink, to take what was written so far out of it (the writer
    /// counts offsets itself, so a drained `Vec` is fine).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes the central directory and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.finish_entry()?;
        let cd_start = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let big_size = e.zip64 || e.size >= U32_MAX;
            let big_offset = e.offset >= U32_MAX;
            let mut extra = Vec::new();
            if big_size {
                extra.extend_from_slice(&e.size.to_le_bytes());
                extra.extend_from_slice(&e.size.to_le_bytes());
            }
            if big_offset {
                extra.extend_from_slice(&e.offset.to_le_bytes());
            }
            let mut h = Vec::with_capacity(46 + e.name.len() + 28);
            h.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            h.extend_from_slice(&((3u16 << 8) | 45).to_le_bytes()); // made by: Unix
            let needed: u16 = if big_size || big_offset { 45 } else { 20 };
            h.extend_from_slice(&needed.to_le_bytes());
            h.extend_from_slice(&FLAGS.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&e.dos.0.to_le_bytes());
            h.extend_from_slice(&e.dos.1.to_le_bytes());
            h.extend_from_slice(&e.crc.to_le_bytes());
            let size32 = if big_size { 0xFFFF_FFFF } else { e.size as u32 };
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            let extra_len = if extra.is_empty() { 0 } else { extra.len() + 4 };
            h.extend_from_slice(&(extra_len as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // comment
            h.extend_from_slice(&0u16.to_le_bytes()); // disk
            h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
            h.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
            let off32 = if big_offset {
                0xFFFF_FFFF
            } else {
                e.offset as u32
            };
            h.extend_from_slice(&off32.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            if !extra.is_empty() {
                h.extend_from_slice(&1u16.to_le_bytes());
                h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
                h.extend_from_slice(&extra);
            }
            self.put(&h)?;
        }
        let cd_size = self.pos - cd_start;
        let count = entries.len() as u64;
        let need64 = count >= 0xFFFF
            || cd_size >= U32_MAX
            || cd_start >= U32_MAX
            || self.zip64_from < U32_MAX;
        if need64 {
            let z64_start = self.pos;
            let mut r = Vec::with_capacity(56 + 20);
            r.extend_from_slice(&ZIP64_END_SIG.to_le_bytes());
            r.extend_from_slice(&44u64.to_le_bytes());
            r.extend_from_slice(&((3u16 << 8) | 45).to_le_bytes());
            r.extend_from_slice(&45u16.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&cd_size.to_le_bytes());
            r.extend_from_slice(&cd_start.to_le_bytes());
            r.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&z64_start.to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            self.put(&r)?;
        }
        let mut end = Vec::with_capacity(22);
        end.extend_from_slice(&END_SIG.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        let count16 = if need64 { 0xFFFF } else { count as u16 };
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&count16.to_le_bytes());
        let cd_size32 = if need64 { 0xFFFF_FFFF } else { cd_size as u32 };
        let cd_start32 = if need64 { 0xFFFF_FFFF } else { cd_start as u32 };
        end.extend_from_slice(&cd_size32.to_le_bytes());
        end.extend_from_slice(&cd_start32.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.put(&end)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
    }
    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_le_bytes(b[i..i + 2].try_into().unwrap())
    }

    /// Reads the archive back through its central directory, the way
    /// unzip does, and checks names, sizes and CRCs against the data.
    #[test]
    fn archive_reads_back() {
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("logs/session.log", b"hello\nworld\n".to_vec()),
            ("empty.txt", vec![]),
            ("data/blob.bin", (0..70_000u32).map(|i| i as u8).collect()),
        ];
        let mut z = ZipWriter::new(Vec::new());
        for (name, data) in &files {
            z.start_entry(name, data.len() as u64, 1_736_496_000)
                .unwrap();
            for chunk in data.chunks(4096) {
                z.write_data(chunk).unwrap();
            }
        }
        let out = z.finish().unwrap();
        let end = out.len() - 22;
        assert_eq!(u32_at(&out, end), END_SIG);
        assert_eq!(u16_at(&out, end + 10) as usize, files.len());
        let mut p = u32_at(&out, end + 16) as usize;
        for (name, data) in &files {
            assert_eq!(u32_at(&out, p), CENTRAL_SIG);
            let crc = u32_at(&out, p + 16);
            let size = u32_at(&out, p + 24) as usize;
            let name_len = u16_at(&out, p + 28) as usize;
            let offset = u32_at(&out, p + 42) as usize;
            assert_eq!(&out[p + 46..p + 46 + name_len], name.as_bytes());
            assert_eq!(size, data.len());
            let mut c = flate2::Crc::new();
            c.update(data);
            assert_eq!(crc, c.sum());
            assert_eq!(u32_at(&out, offset), LOCAL_SIG);
            let start = offset + 30 + u16_at(&out, offset + 26) as usize;
            assert_eq!(&out[start..start + size], &data[..]);
            assert_eq!(u32_at(&out, start + size), DESCRIPTOR_SIG);
            assert_eq!(u32_at(&out, start + size + 4), crc);
            p += 46 + name_len;
        }
    }

    /// With ZIP64 forced from 1 byte: the local extra field, 8-byte
    /// descriptor sizes, central ZIP64 sizes and the ZIP64 end records are
    /// where readers look for them.
    #[test]
    fn zip64_records() {
        let data = b"zip64 payload".to_vec();
        let mut z = ZipWriter::new(Vec::new());
        z.zip64_from = 1;
        z.start_entry("big.bin", data.len() as u64, 1_736_496_000)
            .unwrap();
        z.write_data(&data).unwrap();
        let out = z.finish().unwrap();
        // Local header: version 45, sizes 0xFFFFFFFF, extra id 1 of 16 bytes.
        assert_eq!(u16_at(&out, 4), 45);
        assert_eq!(u32_at(&out, 18), 0xFFFF_FFFF);
        let name_len = u16_at(&out, 26) as usize;
        assert_eq!(u16_at(&out, 28), 20);
        assert_eq!(u16_at(&out, 30 + name_len), 1);
        let start = 30 + name_len + 20;
        assert_eq!(&out[start..start + data.len()], &data[..]);
        // Descriptor with 8-byte sizes.
        let d = start + data.len();
        assert_eq!(u32_at(&out, d), DESCRIPTOR_SIG);
        assert_eq!(
            u64::from_le_bytes(out[d + 8..d + 16].try_into().unwrap()),
            data.len() as u64
        );
        assert_eq!(
            u64::from_le_bytes(out[d + 16..d + 24].try_into().unwrap()),
            data.len() as u64
        );
        // End: EOCD at the end, locator before it, ZIP64 EOCD where the
        // locator says, pointing at the central directory.
        let end = out.len() - 22;
        assert_eq!(u32_at(&out, end), END_SIG);
        assert_eq!(u16_at(&out, end + 10), 0xFFFF);
        let loc = end - 20;
        assert_eq!(u32_at(&out, loc), ZIP64_LOCATOR_SIG);
        let z64 = u64::from_le_bytes(out[loc + 8..loc + 16].try_into().unwrap()) as usize;
        assert_eq!(u32_at(&out, z64), ZIP64_END_SIG);
        assert_eq!(
            u64::from_le_bytes(out[z64 + 32..z64 + 40].try_into().unwrap()),
            1
        );
        let cd = u64::from_le_bytes(out[z64 + 48..z64 + 56].try_into().unwrap()) as usize;
        assert_eq!(u32_at(&out, cd), CENTRAL_SIG);
        assert_eq!(u32_at(&out, cd + 24), 0xFFFF_FFFF);
        let extra = cd + 46 + u16_at(&out, cd + 28) as usize;
        assert_eq!((u16_at(&out, extra), u16_at(&out, extra + 2)), (1, 16));
        assert_eq!(
            u64::from_le_bytes(out[extra + 4..extra + 12].try_into().unwrap()),
            data.len() as u64
        );
    }

    #[test]
    fn oversized_data_is_refused() {
        let mut z = ZipWriter::new(io::sink());
        assert!(z.write_data(b"x").is_err());
    }
}
