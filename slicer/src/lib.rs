//! # nakshatra-slicer
//!
//! Reads GGUF models and cuts them into contiguous layer-range slices that
//! stock llama.cpp loads unmodified, so that one model can run split across
//! machines. Stand-alone: no llama.cpp, no network.
//!
//! - [`Gguf`]: a memory-mapped (or in-memory), fully validated GGUF v2/v3
//!   file (metadata, tensor infos with absolute data offsets, tensor bytes).
//!   Damaged or hostile input gives a [`GgufError`], never a panic.
//! - [`inspect`]: shape and content hashes of a model or slice
//!   ([`ModelInfo`]).
//! - [`write_slice`]: writes layers `start..end` as a new GGUF (and, for a
//!   first slice, an embedding sidecar).
//! - [`write_gguf`]: the streaming GGUF writer underneath.
//! - [`vocab_gguf`] / [`verify_vocab`]: a tensor-less GGUF carrying a model's
//!   tokenizer and chat template, for nodes without the model file, and its
//!   check against the model id.
//! - [`manifest`] / [`Manifest`] / [`PieceHasher`] /
//!   [`write_slice_from_pieces`]: the model as verifiable pieces (a block,
//!   the embedding, the head, the other globals), so a node can fetch the
//!   layers it serves from peers, check every piece against the model id
//!   and write its slice byte-identical to [`write_slice`] (see [`pieces`]).
//!
//! ## Slicing recipe
//!
//! Shown bit-exact against the whole model with llama.cpp (see
//! `shared/research/llama-slicing.md`): a slice keeps the blocks of its range
//! renumbered from 0, `output_norm.weight` and every other global tensor
//! (e.g. `rope_freqs.weight`). A slice that is not last has no vocabulary
//! (`tokenizer.ggml.model = "none"`, `{arch}.vocab_size = 1`), a zero
//! `[n_embd, 1]` F32 `token_embd.weight` placeholder (llama.cpp requires the
//! tensor) and no output head; it is fed hidden states and its output is read
//! from `l_out-{n-1}`. The last slice keeps the tokenizer, `token_embd`
//! and the head. The first slice's token lookup happens outside llama.cpp,
//! from the sidecar `<out>.embd.gguf` holding the original
//! `token_embd.weight` (an extra tensor inside the slice would be rejected by
//! llama.cpp's loader). See [`write_slice`] for the details.
//!
//! ## Model id and hashes
//!
//! Ids are content-addressed and deterministic: BLAKE3 over each block's
//! tensors (names normalised to `blk.N.*`, so a layer hashes the same at any
//! index and in any slice), over the embedding, the head and the remaining
//! global tensors, and a model id over the architecture, shape, all
//! non-`general.*` metadata and those hashes. The exact encoding is specified
//! in [`hash`]. File names never matter.

pub mod arch;
mod error;
mod gguf;
pub mod hash;
mod info;
mod name;
pub mod pieces;
mod slice;
mod vocab;

pub use arch::{check_model_range, family, Family, RangeRules, FAMILIES};
pub use error::{GgufError, SliceError, WriteError};
pub use gguf::read::{Gguf, TensorInfo};
pub use gguf::types::{ggml_type_info, GgmlTypeInfo, GGML_TYPE_F32};
pub use gguf::value::{MetaArray, MetaValue, ValueType};
pub use gguf::write::{write_gguf, NewTensor, TensorData, WRITE_VERSION};
pub use gguf::{DEFAULT_ALIGNMENT, MAX_DIMS};
pub use info::{header_layers, inspect, model_layers, HeaderLayers, ModelInfo, SliceMeta};
pub use name::model_name;
pub use pieces::{
    manifest, manifest_and_vocab, piece_segments, pieces_held, write_slice_from_pieces, Manifest,
    Piece, PieceHasher, PieceId, PieceTensor, MAX_PIECES_ALIGNMENT,
};
pub use slice::{
    embd_sidecar_path, supported_arch, write_early_exit, write_slice, SliceOutput, FORMAT_VERSION,
};
pub use vocab::{verify_vocab, vocab_gguf, ModelHashes, VocabInfo, VOCAB_ROLE};

/// Metadata keys read or written by this crate.
pub mod keys {
    /// `general.architecture` (string).
    pub const ARCH: &str = "general.architecture";
    /// `general.alignment` (u32).
    pub const ALIGNMENT: &str = "general.alignment";
    /// Id of the model a slice or sidecar was cut from (string).
    pub const SOURCE_MODEL_ID: &str = "nakshatra.source_model_id";
    /// First source layer in a slice (u32).
    pub const LAYER_START: &str = "nakshatra.layer_start";
    /// One past the last source layer in a slice (u32).
    pub const LAYER_END: &str = "nakshatra.layer_end";
    /// Layers in the source model (u32).
    pub const N_LAYERS_TOTAL: &str = "nakshatra.n_layers_total";
    /// Version of the slice format (u32, currently 1).
    pub const FORMAT_VERSION: &str = "nakshatra.format_version";
    /// Role of an auxiliary file: `"token_embd"` for an embedding sidecar,
    /// `"vocab"` ([`crate::VOCAB_ROLE`]) for a vocabulary file.
    pub const ROLE: &str = "nakshatra.role";
}
