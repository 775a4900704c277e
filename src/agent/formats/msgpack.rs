//! A small msgpack reader over a byte slice for the Forward decoder: a
//! resumable, allocation-free scanner that finds where a value ends (to
//! frame a stream), and a converter of values into `serde_json::Value` (the
//! shape record metadata is kept in).
//!
//! Invariant: nothing here trusts a length prefix to allocate: capacities
//! are capped by the bytes actually present, and conversion depth is
//! bounded, so hostile input costs at most its own size.

use base64::Engine as _;
use serde_json::{Map, Number, Value};

/// Deepest nesting converted; a record nested deeper is refused (a stack
/// overflow would take the whole agent down).
pub const MAX_DEPTH: usize = 64;
/// Longest map key kept from a key that is not text (see
/// [`Reader::map_body`]).
pub const MAX_KEY: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The input ends inside a value.
    Eof,
    /// Byte 0xc1, which msgpack never uses.
    Reserved,
    TooDeep,
}

/// One decoded head: scalars carry their value, containers their length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Head<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext(i8, &'a [u8]),
}

#[derive(Debug, Clone)]
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::Eof)?;
        let s = self.buf.get(self.pos..end).ok_or(Error::Eof)?;
        self.pos = end;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn len8(&mut self) -> Result<usize, Error> {
        Ok(self.be::<1>()?[0] as usize)
    }
    fn len16(&mut self) -> Result<usize, Error> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, Error> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Reads one head. On error the position is unspecified; callers that
    /// resume keep their own copy.
    pub fn head(&mut self) -> Result<Head<'a>, Error> {
        let b = self.be::<1>()?[0];
        Ok(match b {
            0x00..=0x7f => Head::Uint(b as u64),
            0x80..=0x8f => Head::Map((b & 0x0f) as u32),
            0x90..=0x9f => Head::Array((b & 0x0f) as u32),
            0xa0..=0xbf => Head::Str(self.take((b & 0x1f) as usize)?),
            0xc0 => Head::Nil,
            0xc1 => return Err(Error::Reserved),
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 => {
                let n = self.len8()?;
                Head::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.len16()?;
                Head::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.len32()?;
                Head::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = match b {
                    0xc7 => self.len8()?,
                    0xc8 => self.len16()?,
                    _ => self.len32()?,
                };
                let t = self.be::<1>()?[0] as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xca => Head::F32(f32::from_be_bytes(self.be()?)),
            0xcb => Head::F64(f64::from_be_bytes(self.be()?)),
            0xcc => Head::Uint(self.be::<1>()?[0] as u64),
            0xcd => Head::Uint(u16::from_be_bytes(self.be()?) as u64),
            0xce => Head::Uint(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Head::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => Head::Int(self.be::<1>()?[0] as i8 as i64),
            0xd1 => Head::Int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Head::Int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Head::Int(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => {
                let t = self.be::<1>()?[0] as i8;
                Head::Ext(t, self.take(1 << (b - 0xd4))?)
            }
            0xd9 => {
                let n = self.len8()?;
                Head::Str(self.take(n)?)
            }
            0xda => {
                let n = self.len16()?;
                Head::Str(self.take(n)?)
            }
            0xdb => {
                let n = self.len32()?;
                Head::Str(self.take(n)?)
            }
            0xdc => Head::Array(self.len16()? as u32),
            0xdd => Head::Array(self.len32()? as u32),
            0xde => Head::Map(self.len16()? as u32),
            0xdf => Head::Map(self.len32()? as u32),
            0xe0..=0xff => Head::Int(b as i8 as i64),
        })
    }

    /// Skips one whole value.
    pub fn skip(&mut self) -> Result<(), Error> {
        let mut scan = Scan::new(self.pos);
        scan.run(self.buf)?;
        self.pos = scan.pos;
        Ok(())
    }

    /// Reads one value as JSON (see [`to_json`] for the mapping).
    pub fn value(&mut self) -> Result<Value, Error> {
        self.value_at(0)
    }

    pub fn value_at(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        Ok(match self.head()? {
            Head::Nil => Value::Null,
            Head::Bool(b) => Value::Bool(b),
            Head::Uint(u) => Value::Number(u.into()),
            Head::Int(i) => Value::Number(i.into()),
            Head::F32(f) => float(f as f64),
            Head::F64(f) => float(f),
            Head::Str(s) => Value::String(text(s)),
            Head::Bin(b) => Value::String(bin_text(b)),
            Head::Ext(t, data) => ext(t, data),
            Head::Array(n) => {
                let mut v = Vec::with_capacity(self.cap(n));
                for _ in 0..n {
                    v.push(self.value_at(depth + 1)?);
                }
                Value::Array(v)
            }
            Head::Map(n) => Value::Object(self.map_body(n, depth)?),
        })
    }

    /// Reads the `n` pairs of a map whose head was already read.
    pub fn map_body(&mut self, n: u32, depth: usize) -> Result<Map<String, Value>, Error> {
        let mut m = Map::new();
        for _ in 0..n {
            // Keys are text in every real sender; anything else keeps its
            // JSON text so no information is lost.
            let key = match self.value_at(depth + 1)? {
                Value::String(s) => s,
                // A key that is not text is kept as its JSON, cut short:
                // maps as keys of maps as keys would otherwise grow
                // exponentially with the nesting (each level escapes the
                // quotes of the one below).
                other => {
                    let mut k = other.to_string();
                    if k.len() > MAX_KEY {
                        let mut at = MAX_KEY;
                        while !k.is_char_boundary(at) {
                            at -= 1;
                        }
                        k.truncate(at);
                    }
                    k
                }
            };
            let v = self.value_at(depth + 1)?;
            m.insert(key, v);
        }
        Ok(m)
    }

    /// A safe preallocation for `n` elements: each takes at least one byte.
    fn cap(&self, n: u32) -> usize {
        (n as usize).min(self.buf.len().saturating_sub(self.pos))
    }
}

/// A resumable "where does this value end" scan. `pending` counts values
/// still to skip; containers add their elements. Iterative, so nesting
/// depth costs no stack. On [`Error::Eof`] `pos` stays at the start of the
/// incomplete head, so running again with more bytes continues the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    pub pos: usize,
    pending: u64,
}

impl Scan {
    pub fn new(pos: usize) -> Scan {
        Scan { pos, pending: 1 }
    }

    /// Advances over `buf` until the value is complete (`Ok`, `pos` is its
    /// end) or the bytes run out (`Err(Eof)`, resumable).
    pub fn run(&mut self, buf: &[u8]) -> Result<(), Error> {
        while self.pending > 0 {
            let mut r = Reader { buf, pos: self.pos };
            let head = r.head()?;
            self.pending -= 1;
            match head {
                Head::Array(n) => self.pending += n as u64,
                Head::Map(n) => self.pending += 2 * n as u64,
                _ => {}
            }
            self.pos = r.pos;
        }
        Ok(())
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// msgpack str is UTF-8 by the spec; a sender that breaks it still gets its
/// text through, with replacement characters where bytes were invalid.
pub fn text(s: &[u8]) -> String {
    match std::str::from_utf8(s) {
        Ok(t) => t.to_owned(),
        Err(_) => String::from_utf8_lossy(s).into_owned(),
    }
}

/// Old msgpack senders (and some Fluentd plugins) send strings as bin:
/// valid UTF-8 is taken as text, anything else is kept as base64.
fn bin_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(t) => t.to_owned(),
        Err(_) => base64::engine::general_purpose::STANDARD.encode(b),
    }
}

/// Fluentd's EventTime (ext 0) becomes Unix nanoseconds; other extension
/// types keep their type and bytes.
fn ext(t: i8, data: &[u8]) -> Value {
    if let Some(ns) = event_time(t, data) {
        return Value::Number(ns.into());
    }
    serde_json::json!({
        "ext_type": t,
        "data": base64::engine::general_purpose::STANDARD.encode(data),
    })
}

/// Decodes Fluentd's EventTime: ext type 0, big-endian u32 seconds and u32
/// nanoseconds.
pub fn event_time(t: i8, data: &[u8]) -> Option<i64> {
    if t != 0 || data.len() != 8 {
        return None;
    }
    let s = u32::from_be_bytes(data[..4].try_into().ok()?) as i64;
    let ns = u32::from_be_bytes(data[4..].try_into().ok()?) as i64;
    (ns < 1_000_000_000).then_some(s * 1_000_000_000 + ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Maps as keys of maps as keys, 60 deep, whose quotes each level
    /// escapes again: bounded keys, not an exponential string (found by
    /// the `forward` fuzz target, as an out-of-memory).
    #[test]
    fn keys_that_are_maps_stay_short_however_deep() {
        // {key: nil} whose key is the next map, down to {"\"": nil}.
        let mut bytes = vec![0x81; 60];
        bytes.extend_from_slice(b"\xa1\"\xc0");
        bytes.extend([0xc0; 60]);
        let v = Reader::new(&bytes).value().unwrap();
        let Value::Object(m) = v else { panic!() };
        let (key, _) = m.iter().next().unwrap();
        assert!(key.len() <= MAX_KEY, "{}", key.len());
        assert!(key.starts_with("{\"{\\\""), "{key}");
    }

    fn check(bytes: &[u8], expected: Result<Value, Error>) {
        let mut r = Reader::new(bytes);
        let got = r.value();
        assert_eq!(got, expected, "{bytes:02x?}");
        if got.is_ok() {
            assert!(r.at_end(), "value did not consume {bytes:02x?}");
            let mut s = Scan::new(0);
            assert_eq!(s.run(bytes), Ok(()));
            assert_eq!(s.pos, bytes.len());
        }
    }

    #[test]
    fn values() {
        check(b"\xc0", Ok(json!(null)));
        check(b"\x7f", Ok(json!(127)));
        check(b"\xff", Ok(json!(-1)));
        check(b"\xd0\x80", Ok(json!(-128)));
        check(b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", Ok(json!(u64::MAX)));
        check(b"\xcb\x40\x0c\x00\x00\x00\x00\x00\x00", Ok(json!(3.5)));
        check(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", Ok(json!(null))); // NaN
        check(b"\xa3abc", Ok(json!("abc")));
        check(b"\xc4\x02hi", Ok(json!("hi")));
        check(b"\xc4\x02\xff\xfe", Ok(json!("//4=")));
        check(b"\x92\x01\xa1x", Ok(json!([1, "x"])));
        check(b"\x82\xa1a\x01\x02\xc3", Ok(json!({"a": 1, "2": true})));
        check(
            b"\xd7\x00\x69\x26\x51\xd8\x00\x00\x00\x05",
            Ok(json!(1_764_119_000_000_000_005_i64)),
        );
        check(b"\xd4\x05\x01", Ok(json!({"ext_type": 5, "data": "AQ=="})));
        check(b"\xc1", Err(Error::Reserved));
        check(b"\xa3ab", Err(Error::Eof));
        check(b"\xdd\xff\xff\xff\xff", Err(Error::Eof));
        check(&[0x91; 100], Err(Error::TooDeep));
    }

    #[test]
    fn scan_resumes_across_chunks() {
        let whole = b"\x93\xa5robot\xcb\x40\x0c\x00\x00\x00\x00\x00\x00\x81\xa1k\x92\x01\x02";
        for split in 0..whole.len() {
            let mut s = Scan::new(0);
            assert_eq!(s.run(&whole[..split]), Err(Error::Eof), "split {split}");
            assert_eq!(s.run(whole), Ok(()));
            assert_eq!(s.pos, whole.len());
        }
    }
}
