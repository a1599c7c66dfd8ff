//! Typed GGUF metadata values and their on-disk encoding.

use std::io::{self, Write};
use std::ops::Range;

/// The type tag of a GGUF metadata value (`enum gguf_type`), as stored in the
/// file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// `u8`, tag 0.
    U8,
    /// `i8`, tag 1.
    I8,
    /// `u16`, tag 2.
    U16,
    /// `i16`, tag 3.
    I16,
    /// `u32`, tag 4.
    U32,
    /// `i32`, tag 5.
    I32,
    /// `f32`, tag 6.
    F32,
    /// `bool` (one byte, 0 or 1), tag 7.
    Bool,
    /// UTF-8 string with a `u64` length prefix, tag 8.
    String,
    /// Array: element tag (`u32`), count (`u64`), elements; tag 9.
    Array,
    /// `u64`, tag 10.
    U64,
    /// `i64`, tag 11.
    I64,
    /// `f64`, tag 12.
    F64,
}

impl ValueType {
    /// The numeric tag written in the file.
    pub fn tag(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// The type for a numeric tag, `None` if the tag is not a GGUF type.
    pub fn from_tag(tag: u32) -> Option<ValueType> {
        Some(match tag {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The smallest number of bytes one value of this type takes in a file
    /// (used to reject absurd element counts before allocating).
    pub(crate) fn min_encoded_len(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 32-bit float.
    F32(f32),
    /// 64-bit float.
    F64(f64),
    /// Boolean (one byte on disk, 0 or 1).
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Typed array (all elements share one type).
    Array(MetaArray),
}

/// A typed GGUF array. Arrays of arrays are allowed by the GGUF format (each
/// inner array carries its own element type), although ggml itself refuses
/// to load them.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    /// Array of `u8`.
    U8(Vec<u8>),
    /// Array of `i8`.
    I8(Vec<i8>),
    /// Array of `u16`.
    U16(Vec<u16>),
    /// Array of `i16`.
    I16(Vec<i16>),
    /// Array of `u32`.
    U32(Vec<u32>),
    /// Array of `i32`.
    I32(Vec<i32>),
    /// Array of `u64`.
    U64(Vec<u64>),
    /// Array of `i64`.
    I64(Vec<i64>),
    /// Array of `f32`.
    F32(Vec<f32>),
    /// Array of `f64`.
    F64(Vec<f64>),
    /// Array of booleans (one byte each on disk, 0 or 1).
    Bool(Vec<bool>),
    /// Array of strings (e.g. `tokenizer.ggml.tokens`).
    String(Vec<String>),
    /// Array of arrays, each inner array with its own element type.
    Array(Vec<MetaArray>),
}

impl MetaValue {
    /// The GGUF type tag of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::F64(_) => ValueType::F64,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
        }
    }

    /// The value as a `u64` if it is an integer of any width that is not
    /// negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a `u32` if it is a non-negative integer that fits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is an array value.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human-readable rendering for error messages (long strings
    /// and arrays are abbreviated).
    pub fn brief(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("an array of {} {:?} values", a.len(), a.elem_type()),
            MetaValue::String(s) if s.len() > 60 => format!("a string of {} bytes", s.len()),
            v => format!("{v:?}"),
        }
    }

    /// Writes the value in GGUF encoding, *without* its leading type tag
    /// (arrays do include their element tag and count).
    pub fn write_payload<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        match self {
            MetaValue::U8(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::I8(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::U16(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::I16(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::U32(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::I32(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::U64(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::I64(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::F32(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::F64(v) => w.write_all(&v.to_le_bytes()),
            MetaValue::Bool(v) => w.write_all(&[u8::from(*v)]),
            MetaValue::String(s) => write_str(w, s),
            MetaValue::Array(a) => a.write_encoded(w),
        }
    }

    /// Writes the value's type tag (`u32`) followed by its payload: exactly
    /// the bytes that follow the key of a GGUF metadata entry.
    pub fn write_tagged<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(&self.value_type().tag().to_le_bytes())?;
        self.write_payload(w)
    }
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The type of the elements ([`ValueType::Array`] for an array of
    /// arrays, whatever the inner arrays hold).
    pub fn elem_type(&self) -> ValueType {
        match self {
            MetaArray::U8(_) => ValueType::U8,
            MetaArray::I8(_) => ValueType::I8,
            MetaArray::U16(_) => ValueType::U16,
            MetaArray::I16(_) => ValueType::I16,
            MetaArray::U32(_) => ValueType::U32,
            MetaArray::I32(_) => ValueType::I32,
            MetaArray::U64(_) => ValueType::U64,
            MetaArray::I64(_) => ValueType::I64,
            MetaArray::F32(_) => ValueType::F32,
            MetaArray::F64(_) => ValueType::F64,
            MetaArray::Bool(_) => ValueType::Bool,
            MetaArray::String(_) => ValueType::String,
            MetaArray::Array(_) => ValueType::Array,
        }
    }

    /// A copy of the elements in `range`, or `None` if the range is out of
    /// bounds or reversed.
    pub fn sub_array(&self, range: Range<usize>) -> Option<MetaArray> {
        fn cut<T: Clone>(v: &[T], r: Range<usize>) -> Option<Vec<T>> {
            v.get(r).map(<[T]>::to_vec)
        }
        Some(match self {
            MetaArray::U8(v) => MetaArray::U8(cut(v, range)?),
            MetaArray::I8(v) => MetaArray::I8(cut(v, range)?),
            MetaArray::U16(v) => MetaArray::U16(cut(v, range)?),
            MetaArray::I16(v) => MetaArray::I16(cut(v, range)?),
            MetaArray::U32(v) => MetaArray::U32(cut(v, range)?),
            MetaArray::I32(v) => MetaArray::I32(cut(v, range)?),
            MetaArray::U64(v) => MetaArray::U64(cut(v, range)?),
            MetaArray::I64(v) => MetaArray::I64(cut(v, range)?),
            MetaArray::F32(v) => MetaArray::F32(cut(v, range)?),
            MetaArray::F64(v) => MetaArray::F64(cut(v, range)?),
            MetaArray::Bool(v) => MetaArray::Bool(cut(v, range)?),
            MetaArray::String(v) => MetaArray::String(cut(v, range)?),
            MetaArray::Array(v) => MetaArray::Array(cut(v, range)?),
        })
    }

    /// Writes element tag (`u32`), count (`u64`) and the elements.
    pub fn write_encoded<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(&self.elem_type().tag().to_le_bytes())?;
        w.write_all(&(self.len() as u64).to_le_bytes())?;
        macro_rules! each {
            ($v:expr) => {{
                for x in $v {
                    w.write_all(&x.to_le_bytes())?;
                }
                Ok(())
            }};
        }
        match self {
            MetaArray::U8(v) => w.write_all(v),
            MetaArray::I8(v) => each!(v),
            MetaArray::U16(v) => each!(v),
            MetaArray::I16(v) => each!(v),
            MetaArray::U32(v) => each!(v),
            MetaArray::I32(v) => each!(v),
            MetaArray::U64(v) => each!(v),
            MetaArray::I64(v) => each!(v),
            MetaArray::F32(v) => each!(v),
            MetaArray::F64(v) => each!(v),
            MetaArray::Bool(v) => {
                for &b in v {
                    w.write_all(&[u8::from(b)])?;
                }
                Ok(())
            }
            MetaArray::String(v) => {
                for s in v {
                    write_str(w, s)?;
                }
                Ok(())
            }
            MetaArray::Array(v) => {
                for a in v {
                    a.write_encoded(w)?;
                }
                Ok(())
            }
        }
    }
}

/// Writes a GGUF string: `u64` byte length, then the UTF-8 bytes.
pub fn write_str<W: Write + ?Sized>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for tag in 0..13 {
            let t = ValueType::from_tag(tag);
            assert_eq!(t.map(ValueType::tag), Some(tag));
        }
        assert_eq!(ValueType::from_tag(13), None);
    }

    #[test]
    fn integer_views() {
        assert_eq!(MetaValue::I32(-1).as_u64(), None);
        assert_eq!(MetaValue::I64(7).as_u32(), Some(7));
        assert_eq!(MetaValue::U64(1 << 40).as_u32(), None);
        assert_eq!(MetaValue::F32(1.0).as_u64(), None);
    }

    #[test]
    fn encoding() {
        let mut out = Vec::new();
        MetaValue::Array(MetaArray::String(vec!["ab".into()]))
            .write_tagged(&mut out)
            .unwrap();
        let mut want = vec![9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        want.extend([2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
        assert_eq!(out, want);
        let a = MetaArray::U32(vec![1, 2, 3, 4]);
        assert_eq!(a.sub_array(1..3), Some(MetaArray::U32(vec![2, 3])));
        assert_eq!(a.sub_array(3..5), None);
    }
}
