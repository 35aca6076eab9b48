//! The field codec: bounded readers and writers of little-endian fields.
//!
//! Every packet body is a sequence of fields of these shapes (docs/wire.md §3):
//!
//! | shape | bytes |
//! |---|---|
//! | `u8`, `u16`, `u32`, `u64`, `i64` | fixed width, little-endian |
//! | bytes / string | `u32` length, then that many bytes (strings are UTF-8) |
//! | list | `u32` count, then the elements back to back |
//! | option | `u8` tag (0 = none, 1 = some), then the value if some |
//!
//! [`Reader`] checks each length against a limit and against the bytes actually left
//! before it slices anything, so a decoder built on it cannot over-read, panic or be made
//! to allocate more than its input justifies.

use crate::error::{DecodeError, EncodeError, Limit};

/// A cursor over a borrowed byte slice; every read is bounds-checked.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Creates a reader over `buf`.
    pub const fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Returns the number of unread bytes.
    pub const fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Returns the unread bytes without consuming them.
    pub const fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes the next `n` bytes.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] when fewer than `n` bytes are left.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(DecodeError::Truncated {
                needed: n.saturating_sub(self.buf.len()),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Reads a `u8`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] at the end of input.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u16`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] at the end of input.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u32`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] at the end of input.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u64`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] at the end of input.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `i64`.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] at the end of input.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Reads a `u32`-length-prefixed byte field of at most `max` bytes.
    ///
    /// # Errors
    /// [`DecodeError::LimitExceeded`] (checked first) or [`DecodeError::Truncated`].
    pub fn bytes(&mut self, limit: Limit, max: u32) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()?;
        if len > max {
            return Err(DecodeError::LimitExceeded {
                limit,
                value: u64::from(len),
                max: u64::from(max),
            });
        }
        self.take(usize_from(len))
    }

    /// Reads a `u32`-length-prefixed UTF-8 string of at most `max` bytes.
    ///
    /// # Errors
    /// As [`Reader::bytes`], plus [`DecodeError::InvalidUtf8`].
    pub fn str(&mut self, max: u32) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes(Limit::StringLen, max)?;
        core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Reads a list count: at most `max`, and small enough that `count` elements of at
    /// least `min_elem_len` bytes fit in what is left.
    ///
    /// # Errors
    /// [`DecodeError::LimitExceeded`] or [`DecodeError::CountExceedsInput`].
    pub fn count(
        &mut self,
        limit: Limit,
        max: u32,
        min_elem_len: usize,
    ) -> Result<u32, DecodeError> {
        let count = self.u32()?;
        if count > max {
            return Err(DecodeError::LimitExceeded {
                limit,
                value: u64::from(count),
                max: u64::from(max),
            });
        }
        let fits = usize_from(count)
            .checked_mul(min_elem_len)
            .is_some_and(|need| need <= self.remaining());
        if !fits {
            return Err(DecodeError::CountExceedsInput {
                count,
                remaining: self.remaining(),
            });
        }
        Ok(count)
    }

    /// Ends decoding: every byte must have been consumed.
    ///
    /// # Errors
    /// [`DecodeError::TrailingBytes`].
    pub const fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// A cursor writing into a caller's buffer; every write is bounds-checked.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Creates a writer at the start of `buf`.
    pub const fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Returns the number of bytes written so far.
    pub const fn position(&self) -> usize {
        self.pos
    }

    /// Writes raw bytes.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`] when the buffer is full.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos.checked_add(bytes.len());
        let dst = end.and_then(|end| self.buf.get_mut(self.pos..end));
        match (dst, end) {
            (Some(dst), Some(end)) => {
                dst.copy_from_slice(bytes);
                self.pos = end;
                Ok(())
            }
            _ => Err(EncodeError::BufferTooSmall {
                needed: self.pos.saturating_add(bytes.len()),
            }),
        }
    }

    /// Writes a `u8`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn u8(&mut self, v: u8) -> Result<(), EncodeError> {
        self.put(&[v])
    }

    /// Writes a little-endian `u16`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.put(&v.to_le_bytes())
    }

    /// Writes a little-endian `u32`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn u32(&mut self, v: u32) -> Result<(), EncodeError> {
        self.put(&v.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn u64(&mut self, v: u64) -> Result<(), EncodeError> {
        self.put(&v.to_le_bytes())
    }

    /// Writes a little-endian `i64`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn i64(&mut self, v: i64) -> Result<(), EncodeError> {
        self.put(&v.to_le_bytes())
    }

    /// Writes a `u32` length prefix and the bytes.
    ///
    /// # Errors
    /// [`EncodeError::TooLong`] past `u32::MAX` bytes, or [`EncodeError::BufferTooSmall`].
    pub fn bytes(&mut self, field: &'static str, v: &[u8]) -> Result<(), EncodeError> {
        self.count(field, v.len())?;
        self.put(v)
    }

    /// Writes a `u32` list count.
    ///
    /// # Errors
    /// [`EncodeError::TooLong`] past `u32::MAX`, or [`EncodeError::BufferTooSmall`].
    pub fn count(&mut self, field: &'static str, n: usize) -> Result<(), EncodeError> {
        let n = u32::try_from(n).map_err(|_| EncodeError::TooLong { field, len: n })?;
        self.u32(n)
    }
}

/// Converts a wire `u32` to `usize` (lossless on the 32- and 64-bit targets tp supports).
pub(crate) fn usize_from(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Length of a `u32`-prefixed byte field holding `len` bytes.
pub(crate) const fn bytes_len(len: usize) -> usize {
    len.saturating_add(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_truncated_reports_missing_bytes() {
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.u32(), Err(DecodeError::Truncated { needed: 2 }));
    }

    #[test]
    fn reader_bytes_over_limit_rejected_before_slicing() {
        // Announces 4 GiB - 1 with only 1 byte present: the limit fires, not a slice.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert!(matches!(
            r.bytes(Limit::MetadataLen, 16),
            Err(DecodeError::LimitExceeded {
                limit: Limit::MetadataLen,
                ..
            })
        ));
    }

    #[test]
    fn reader_count_must_fit_remaining_input() {
        let mut r = Reader::new(&[10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            r.count(Limit::ListLen, 100, 8),
            Err(DecodeError::CountExceedsInput {
                count: 10,
                remaining: 4
            })
        );
    }

    #[test]
    fn writer_reports_needed_length() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        assert_eq!(w.u32(7), Err(EncodeError::BufferTooSmall { needed: 4 }));
    }

    #[test]
    fn reader_finish_rejects_trailing_bytes() {
        let r = Reader::new(&[0]);
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
    }
}
