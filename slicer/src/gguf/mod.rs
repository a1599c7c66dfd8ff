//! GGUF file format: reading (memory-mapped, fully validated), writing
//! (streaming) and the ggml type table.
//!
//! Hand-written rather than built on the `ggus` crate (0.5.1), which was
//! evaluated and rejected:
//! - its parser panics on damaged input: `GGuf::new` slices `&data[..data_len]`
//!   when tensor data runs past the end of the file, reserves
//!   `IndexMap::with_capacity(metadata_kv_count)` straight from the header,
//!   and `GGufReader::skip` calls `Layout::array(len).unwrap()` on lengths read
//!   from the file; offset + size sums are unchecked;
//! - it only accepts GGUF version 3;
//! - it is edition 2024 and pulls in `ggml-quants`, `indexmap`, `num_enum` and
//!   `regex`, none of which this crate otherwise needs.
//!
//! GGUF is small (a header, typed key/values, tensor infos, aligned data), so
//! a careful reader (~400 lines) whose every length and offset is checked
//! against the file size is simpler to trust than patching around those
//! panics. The rules follow ggml's own loader (`ggml/src/gguf.cpp`):
//! versions 2 and 3, `general.alignment` a `u32` power of two (default 32),
//! at most 4 dims, row length a multiple of the block size, tensor offsets
//! aligned; and additionally all tensor data must lie within the file.

pub mod read;
pub mod types;
pub mod value;
pub mod write;

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

#[cfg(test)]
mod tests;
