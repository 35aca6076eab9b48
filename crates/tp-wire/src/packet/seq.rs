//! [`Seq`]: a list that is either a caller's slice or validated wire bytes.

use core::fmt;

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError, Limit};
use crate::limits::Limits;

/// An element of a wire list.
pub trait Element<'a>: Copy + Sized {
    /// The fewest bytes one element can occupy (used to reject impossible counts early).
    const MIN_LEN: usize;

    /// Decodes one element, checking its lengths against `limits`.
    ///
    /// # Errors
    /// A [`DecodeError`].
    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError>;

    /// Returns the encoded length of this element.
    fn wire_len(&self) -> usize;

    /// Encodes this element.
    ///
    /// # Errors
    /// An [`EncodeError`].
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
}

/// A list inside a packet: a slice built by the sender, or the validated bytes of a
/// received list, decoded element by element as it is iterated (no allocation).
#[derive(Clone, Copy)]
pub enum Seq<'a, T> {
    /// Elements supplied by the caller, for encoding.
    Slice(&'a [T]),
    /// A list that was parsed and validated: its element count and its bytes.
    Wire {
        /// Number of elements.
        count: u32,
        /// The encoded elements (without the count).
        bytes: &'a [u8],
    },
}

impl<'a, T: Element<'a>> Seq<'a, T> {
    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::Slice(s) => s.len(),
            Self::Wire { count, .. } => crate::codec::usize_from(*count),
        }
    }

    /// Returns `true` when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over the elements.
    pub fn iter(&self) -> SeqIter<'a, T> {
        match *self {
            Self::Slice(s) => SeqIter::Slice(s.iter()),
            Self::Wire { count, bytes } => SeqIter::Wire {
                reader: Reader::new(bytes),
                left: count,
            },
        }
    }

    /// Reads a `u32` count and that many elements, validating each.
    pub(crate) fn decode(
        r: &mut Reader<'a>,
        limit: Limit,
        max: u32,
        limits: &Limits,
    ) -> Result<Self, DecodeError> {
        let count = r.count(limit, max, T::MIN_LEN)?;
        let start = r.rest();
        for _ in 0..count {
            T::decode(r, limits)?;
        }
        let used = start.len().saturating_sub(r.remaining());
        let bytes = start.get(..used).unwrap_or_default();
        Ok(Self::Wire { count, bytes })
    }

    /// Returns the encoded length: the count and the elements.
    pub(crate) fn wire_len(&self) -> usize {
        match self {
            Self::Slice(s) => s
                .iter()
                .fold(4usize, |acc, e| acc.saturating_add(e.wire_len())),
            Self::Wire { bytes, .. } => bytes.len().saturating_add(4),
        }
    }

    pub(crate) fn encode(
        &self,
        field: &'static str,
        w: &mut Writer<'_>,
    ) -> Result<(), EncodeError> {
        match self {
            Self::Slice(s) => {
                w.count(field, s.len())?;
                s.iter().try_for_each(|e| e.encode(w))
            }
            Self::Wire { count, bytes } => {
                w.u32(*count)?;
                w.put(bytes)
            }
        }
    }
}

impl<'a, T: Element<'a> + PartialEq> PartialEq for Seq<'a, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<'a, T: Element<'a> + Eq> Eq for Seq<'a, T> {}

impl<'a, T: Element<'a> + fmt::Debug> fmt::Debug for Seq<'a, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over a [`Seq`].
#[derive(Clone, Debug)]
pub enum SeqIter<'a, T> {
    /// Over a caller's slice.
    Slice(core::slice::Iter<'a, T>),
    /// Over validated wire bytes.
    Wire {
        /// Cursor over the remaining elements.
        reader: Reader<'a>,
        /// Elements left.
        left: u32,
    },
}

impl<'a, T: Element<'a>> Iterator for SeqIter<'a, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Self::Slice(it) => it.next().copied(),
            Self::Wire { reader, left } => {
                *left = left.checked_sub(1)?;
                // The bytes were validated against stricter limits when the list was
                // parsed, so this cannot fail; if it somehow did, iteration just ends.
                T::decode(reader, &Limits::UNLIMITED).ok()
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match self {
            Self::Slice(it) => it.len(),
            Self::Wire { left, .. } => crate::codec::usize_from(*left),
        };
        (n, Some(n))
    }
}

impl<'a, T: Element<'a>> ExactSizeIterator for SeqIter<'a, T> {}
