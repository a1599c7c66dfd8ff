//! Streaming GGUF v3 writer.
//!
//! The layout matches what ggml's `gguf_write_to_file` produces: header,
//! metadata, tensor infos, zero padding to the alignment, then each tensor's
//! data followed by zero padding to the alignment (the last one included).
//! Tensor data is streamed from borrowed slices (typically a memory map), so
//! the output is never built in memory.

use std::collections::HashSet;
use std::io::{self, Write};

use super::read::align_up;
use super::types::tensor_n_bytes;
use super::value::{write_str, MetaValue};
use super::{DEFAULT_ALIGNMENT, MAX_DIMS};
use crate::error::WriteError;

/// The GGUF version this writer produces.
pub const WRITE_VERSION: u32 = 3;

/// Where a new tensor's bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum TensorData<'a> {
    /// These exact bytes (their length must equal the size implied by the
    /// type and shape).
    Bytes(&'a [u8]),
    /// All zero bytes, as many as the type and shape imply.
    Zeros,
}

/// A tensor to write with [`write_gguf`].
#[derive(Debug, Clone)]
pub struct NewTensor<'a> {
    /// Tensor name as written (unique within the file).
    pub name: String,
    /// ggml type id (`enum ggml_type`, e.g. [`crate::GGML_TYPE_F32`]).
    pub ggml_type: u32,
    /// Shape in ggml order (at most 4 dims).
    pub dims: Vec<u64>,
    /// Where the tensor's bytes come from: borrowed bytes of exactly the
    /// size type and shape imply, or zeros.
    pub data: TensorData<'a>,
}

/// Writes a complete GGUF v3 file to `w` and returns the number of bytes
/// written.
///
/// The alignment is taken from `general.alignment` in `metadata` (which must
/// then be a `u32` power of two), else 32. Tensors are laid out in the given
/// order. Everything is validated before the first byte is written: keys must
/// be non-empty and unique, tensor names unique, types known, shapes valid
/// and `Bytes` data of the right length.
pub fn write_gguf<W: Write + ?Sized>(
    w: &mut W,
    metadata: &[(String, MetaValue)],
    tensors: &[NewTensor<'_>],
) -> Result<u64, WriteError> {
    let mut keys = HashSet::new();
    for (k, _) in metadata {
        if k.is_empty() || !keys.insert(k.as_str()) {
            return Err(WriteError::BadMetadata(format!(
                "key {k:?} is empty or appears more than once"
            )));
        }
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(WriteError::BadMetadata(format!(
                "general.alignment must be a u32 power of two, found {}",
                v.brief()
            )))
        }
    };

    // Sizes and data-section offsets.
    let mut names = HashSet::new();
    let mut layout = Vec::with_capacity(tensors.len());
    let mut next: u64 = 0;
    for t in tensors {
        let bad = |reason: String| WriteError::BadTensor {
            name: t.name.clone(),
            reason,
        };
        if !names.insert(t.name.as_str()) {
            return Err(bad("the name appears more than once".into()));
        }
        if t.dims.len() > MAX_DIMS as usize {
            return Err(bad(format!("{} dims, at most {MAX_DIMS}", t.dims.len())));
        }
        let n_bytes = tensor_n_bytes(t.ggml_type, &t.dims).map_err(|e| bad(e.to_string()))?;
        if let TensorData::Bytes(b) = t.data {
            if b.len() as u64 != n_bytes {
                return Err(bad(format!(
                    "{} data bytes given, type and shape need {n_bytes}",
                    b.len()
                )));
            }
        }
        layout.push((next, n_bytes));
        next = next
            .checked_add(n_bytes)
            .and_then(|n| align_up(n, alignment))
            .ok_or_else(|| bad("the file would be too large".into()))?;
    }

    let mut w = Counting { inner: w, n: 0 };
    w.write_all(b"GGUF")?;
    w.write_all(&WRITE_VERSION.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (k, v) in metadata {
        write_str(&mut w, k)?;
        v.write_tagged(&mut w)?;
    }
    for (t, &(offset, _)) in tensors.iter().zip(&layout) {
        write_str(&mut w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes())?;
        }
        w.write_all(&t.ggml_type.to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
    }
    if !tensors.is_empty() {
        pad(&mut w, alignment)?;
    }
    for (t, &(_, n_bytes)) in tensors.iter().zip(&layout) {
        match t.data {
            TensorData::Bytes(b) => w.write_all(b)?,
            TensorData::Zeros => write_zeros(&mut w, n_bytes)?,
        }
        pad(&mut w, alignment)?;
    }
    Ok(w.n)
}

/// A writer that counts bytes.
struct Counting<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write + ?Sized> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad<W: Write + ?Sized>(w: &mut Counting<'_, W>, alignment: u64) -> io::Result<()> {
    let target = align_up(w.n, alignment).unwrap_or(w.n);
    write_zeros(w, target - w.n)
}

fn write_zeros<W: Write + ?Sized>(w: &mut W, mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(ZEROS.get(..k).unwrap_or(&[]))?;
        n -= k as u64;
    }
    Ok(())
}
