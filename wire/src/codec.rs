//! The codec: one [`Codec`] trait (as in rustls), a bounds-checked [`Reader`], and the
//! [`DecodeError`] every decoder returns. Decoders never panic and never allocate more than the
//! bytes that remain in their input.

use thiserror::Error;

/// Why bytes were not a valid message. Malformed input only; a valid message that the protocol
/// refuses is another [`crate::WireError`] (a bad signature, a stale epoch, a gap, ...).
#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    /// Bytes remained after a complete message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The magic bytes are not `GK`.
    #[error("not a gkm message (bad magic)")]
    BadMagic,
    /// An unsupported protocol version.
    #[error(
        "protocol version {0} is not spoken here (this is gkm wire version {ours}): run the \
         same gkm release on the controller and its members",
        ours = crate::message::VERSION
    )]
    BadVersion(u8),
    /// The message type byte is not the one expected here.
    #[error("unexpected message type {0}")]
    BadType(u8),
    /// A count or length exceeds its bound.
    #[error("{field} is {value}, above its limit {limit}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The value read.
        value: usize,
        /// The bound.
        limit: usize,
    },
    /// A field holds a value outside its range.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over input bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Reads a byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads an unsigned LEB128 varint: at most 10 bytes, minimal (no trailing zero byte), no
    /// bits beyond 64.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10u32 {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(DecodeError::Invalid(what));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(DecodeError::Invalid(what));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid(what))
    }

    /// Reads a varint that must not exceed `limit`.
    pub fn varint_at_most(&mut self, limit: u64, what: &'static str) -> Result<u64, DecodeError> {
        let value = self.varint(what)?;
        if value > limit {
            return Err(DecodeError::TooLong {
                field: what,
                value: usize::try_from(value).unwrap_or(usize::MAX),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            });
        }
        Ok(value)
    }

    /// Reads a count of items of `item_len` bytes each, checked against `limit` and against the
    /// bytes that remain, so the caller may allocate `count` items safely.
    pub fn count(
        &mut self,
        width: CountWidth,
        item_len: usize,
        limit: usize,
        what: &'static str,
    ) -> Result<usize, DecodeError> {
        let value = match width {
            CountWidth::U8 => usize::from(self.u8(what)?),
            CountWidth::U16 => usize::from(self.u16(what)?),
        };
        if value > limit {
            return Err(DecodeError::TooLong {
                field: what,
                value,
                limit,
            });
        }
        if value.saturating_mul(item_len) > self.rest.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(value)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// The width of a count prefix.
#[derive(Clone, Copy, Debug)]
pub enum CountWidth {
    /// One byte.
    U8,
    /// Two bytes, big endian.
    U16,
}

/// A value with a specified byte layout.
pub trait Codec: Sized {
    /// Appends the encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from `reader`.
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// The encoding as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes exactly one value: trailing bytes are an error.
    fn decode_exact(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let value = Self::decode(&mut reader)?;
        reader.finish()?;
        Ok(value)
    }
}

/// Writes a count prefix. Callers keep counts within their bound before encoding.
pub(crate) fn put_count(out: &mut Vec<u8>, width: CountWidth, count: usize) {
    match width {
        CountWidth::U8 => out.push(u8::try_from(count).unwrap_or(u8::MAX)),
        CountWidth::U16 => {
            out.extend_from_slice(&u16::try_from(count).unwrap_or(u16::MAX).to_be_bytes());
        }
    }
}

/// Writes `value` as an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, value: u64) {
    let mut rest = value;
    loop {
        let low = rest.to_le_bytes()[0] & 0x7f;
        rest >>= 7;
        if rest == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Bytes of `value` as a varint.
pub(crate) fn varint_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v007_count_is_bounded_by_limit_and_by_remaining_bytes() {
        let mut r = Reader::new(&[0xff, 0xff, 1, 2]);
        assert!(matches!(
            r.count(CountWidth::U16, 4, 100, "items"),
            Err(DecodeError::TooLong { .. })
        ));
        let mut r = Reader::new(&[0, 2, 1, 2]);
        assert_eq!(
            r.count(CountWidth::U16, 4, 100, "items"),
            Err(DecodeError::Truncated("items"))
        );
        let mut r = Reader::new(&[1, 9]);
        assert_eq!(r.count(CountWidth::U8, 1, 4, "items"), Ok(1));
        assert_eq!(r.u8("x"), Ok(9));
        assert!(r.finish().is_ok());
    }

    #[test]
    fn varints_round_trip_and_only_minimal_forms_decode() {
        for value in [0, 1, 127, 128, 300, 1 << 21, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value));
            let mut r = Reader::new(&out);
            assert_eq!(r.varint("v"), Ok(value));
            assert!(r.finish().is_ok());
        }
        // A trailing zero byte (a second encoding of 1), eleven bytes, and bits beyond 64.
        for bad in [
            &[0x81, 0x00][..],
            &[0xff; 11][..],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..],
        ] {
            assert_eq!(Reader::new(bad).varint("v"), Err(DecodeError::Invalid("v")));
        }
        assert_eq!(
            Reader::new(&[0x80]).varint("v"),
            Err(DecodeError::Truncated("v"))
        );
        assert!(matches!(
            Reader::new(&[0x80, 0x01]).varint_at_most(100, "v"),
            Err(DecodeError::TooLong { value: 128, .. })
        ));
    }
}
