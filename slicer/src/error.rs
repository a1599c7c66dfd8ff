//! Error types. Messages are written for end users: each says which file,
//! what is wrong, and where possible what to do about it.

use std::io;
use std::path::PathBuf;

use crate::pieces::PieceId;

/// An error while opening or parsing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or mapped.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// What the OS reported for the open, `stat` or `mmap`.
        #[source]
        source: io::Error,
    },

    /// The file does not start with the GGUF magic bytes (this includes an
    /// empty file).
    #[error("{} is not a GGUF model file (it does not start with the bytes \"GGUF\")", path.display())]
    NotGguf {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
    },

    /// The file ends before a structure it declares.
    #[error(
        "{} is truncated or corrupt: reading {what} needs {needed} bytes at offset {offset}, \
         but the file is only {file_len} bytes long",
        path.display()
    )]
    Truncated {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The structure being read, for people (e.g. `"the tensor count"`).
        what: String,
        /// Byte offset in the file where it starts (`u64::MAX` when the
        /// offset itself overflows).
        offset: u64,
        /// How many bytes it needs, at least (`u64::MAX` when that
        /// overflows).
        needed: u64,
        /// Length of the whole file, in bytes.
        file_len: u64,
    },

    /// The GGUF version is not 2 or 3.
    #[error(
        "{} uses GGUF version {version}, which is not supported (only versions 2 and 3 are; \
         a huge number usually means a big-endian file)",
        path.display()
    )]
    UnsupportedVersion {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The version number in the header (2 and 3 are supported).
        version: u32,
    },

    /// A tensor has a ggml type id that this build does not know.
    #[error("unknown ggml tensor type id {0} (the file is corrupt, or needs a newer nakshatra)")]
    UnknownType(u32),

    /// A metadata value has a type tag that is not a GGUF type.
    #[error("{}: metadata key '{key}' has unknown value type {tag}", path.display())]
    UnknownValueType {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The metadata key whose value has the bad tag.
        key: String,
        /// The value type tag found (GGUF defines 0..=12).
        tag: u32,
    },

    /// A key, tensor name or string value is not valid UTF-8.
    #[error("{}: {what} is not valid UTF-8", path.display())]
    InvalidUtf8 {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// Which string is invalid, for people (e.g. `"the name of tensor
        /// #3"`).
        what: String,
    },

    /// A boolean value is neither 0 nor 1.
    #[error("{}: metadata key '{key}' holds the invalid boolean byte {value}", path.display())]
    InvalidBool {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The metadata key holding the boolean.
        key: String,
        /// The byte found (only 0 and 1 are booleans).
        value: u8,
    },

    /// Arrays are nested deeper than this reader allows.
    #[error("{}: metadata key '{key}' nests arrays more than {max} deep", path.display())]
    TooDeep {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The metadata key holding the nested arrays.
        key: String,
        /// The deepest nesting this reader accepts.
        max: u32,
    },

    /// A metadata key is empty or appears twice.
    #[error("{}: invalid metadata key {key:?}: {reason}", path.display())]
    BadKey {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The key as read (empty, or the duplicate).
        key: String,
        /// What is wrong: empty or duplicate.
        reason: &'static str,
    },

    /// `general.alignment` is not a non-zero power of two stored as `u32`.
    #[error("{}: general.alignment must be a u32 power of two, found {found}", path.display())]
    BadAlignment {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// The value found, printed.
        found: String,
    },

    /// A tensor info is invalid (shape, size, offset or duplicate name).
    #[error("{}: tensor '{name}' is invalid: {reason}", path.display())]
    BadTensor {
        /// The GGUF being read (for [`crate::Gguf::from_bytes`], the name
        /// given in its place).
        path: PathBuf,
        /// Name of the invalid tensor, as in the file.
        name: String,
        /// What is wrong with its shape, size, offset or name.
        reason: String,
    },

    /// The file is a shard of a split model (as llama.cpp's `gguf-split`
    /// writes them) other than the first; a split model is opened from its
    /// first shard, as llama.cpp requires.
    #[error(
        "{} is shard {shard} of {count} of a split model: give the first shard: {first}",
        path.display()
    )]
    NotFirstShard {
        /// The shard that was given.
        path: PathBuf,
        /// Its number, from 1 (`split.no + 1`).
        shard: u32,
        /// How many shards the model has (`split.count`).
        count: u32,
        /// The first shard's path, or a description of its name when the
        /// given file's name does not follow llama.cpp's pattern.
        first: String,
    },

    /// A shard of a split model cannot be found next to the first one.
    #[error(
        "{} is missing: {} is the first of {count} shards of a split model and all of them \
         must lie next to it, named as llama.cpp's gguf-split names them ({source})",
        path.display(),
        first.display()
    )]
    MissingShard {
        /// The shard that is missing.
        path: PathBuf,
        /// The first shard, which was opened.
        first: PathBuf,
        /// How many shards the model has (`split.count`).
        count: u32,
        /// What the OS reported when opening the missing shard.
        #[source]
        source: io::Error,
    },

    /// The shards of a split model do not fit together (bad `split.*` keys,
    /// a shard numbered or counted differently, a tensor in two shards, a
    /// tensor count that does not add up, a file name llama.cpp cannot
    /// derive the other shards from, ...).
    #[error("{}: invalid split model: {reason}", path.display())]
    BadSplit {
        /// The shard at fault (the first shard when the set as a whole is).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An error while writing a GGUF file with [`crate::write_gguf`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The underlying writer failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The metadata is not writable (empty or duplicate key, bad alignment).
    #[error("invalid metadata: {0}")]
    BadMetadata(String),
    /// A tensor's type, shape or data is inconsistent.
    #[error("invalid tensor '{name}': {reason}")]
    BadTensor {
        /// Name of the tensor given to the writer.
        name: String,
        /// What is inconsistent (type, shape or data length).
        reason: String,
    },
}

/// An error while inspecting or slicing a model.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    /// The file is not a readable GGUF file.
    #[error(transparent)]
    Gguf(#[from] GgufError),

    /// The layer range has no layers (`start >= end`).
    #[error("layer range {start}..{end} is empty: the first layer must be lower than the end")]
    EmptyRange {
        /// First layer asked for (inclusive).
        start: u32,
        /// One past the last layer.
        end: u32,
    },

    /// The layer range goes past the model's layers.
    #[error("layers {start}..{end} are out of range: model has {n_layers} layers (0..{n_layers})")]
    RangeOutOfBounds {
        /// First layer asked for (inclusive).
        start: u32,
        /// One past the last layer asked for.
        end: u32,
        /// Number of layers the model has (`block_count`).
        n_layers: u32,
    },

    /// The model architecture cannot be sliced (yet).
    #[error(
        "model architecture '{arch}' is not supported for slicing (supported: {})",
        crate::arch::FAMILIES.iter().map(|f| f.arch).collect::<Vec<_>>().join(", ")
    )]
    UnsupportedArch {
        /// The architecture found in `general.architecture`.
        arch: String,
    },

    /// The family's rules (see [`crate::arch`]) say this range of the model
    /// cannot compute exactly what it computes in the whole model.
    #[error("layers {start}..{end} of this {arch} model cannot be served as a slice: {reason}")]
    RangeRefused {
        /// `general.architecture`.
        arch: String,
        /// First layer asked for (inclusive).
        start: u32,
        /// One past the last layer asked for.
        end: u32,
        /// Why, in words.
        reason: String,
    },

    /// A required metadata key is absent.
    #[error("model metadata has no '{0}' key")]
    MissingKey(String),

    /// A metadata key has the wrong type or an impossible value.
    #[error("model metadata key '{key}' is invalid: {reason}")]
    BadKey {
        /// The metadata key, e.g. `llama.block_count`.
        key: String,
        /// What is wrong with its type or value.
        reason: String,
    },

    /// A required tensor is absent.
    #[error("model has no tensor '{0}'")]
    MissingTensor(String),

    /// The tensors do not form a model we understand (e.g. a block index past
    /// `block_count`).
    #[error("model is malformed: {0}")]
    BadModel(String),

    /// The input file was itself made by nakshatra (a slice or an embedding
    /// sidecar); only original models are sliced, which keeps ids simple.
    #[error(
        "{} is already a nakshatra slice of model {source_id}; slice the original model file instead",
        path.display()
    )]
    AlreadySliced {
        /// The input file that was given as a model to slice.
        path: PathBuf,
        /// The id of the model it was cut from.
        source_id: String,
    },

    /// The input file was made by nakshatra (a slice, an embedding sidecar
    /// or a vocabulary file) where only an original model will do (see
    /// [`crate::vocab_gguf`]).
    #[error(
        "{} was made by nakshatra from model {source_id} (a slice, sidecar or vocabulary file), \
         not an original model; use the original model file instead",
        path.display()
    )]
    NotOriginalModel {
        /// The input file that was given as an original model.
        path: PathBuf,
        /// The id of the model it was made from (`"unknown"` if the file
        /// does not say).
        source_id: String,
    },

    /// A vocabulary file's content does not hash to the model id it was
    /// asked for (see [`crate::verify_vocab`]): it is not that model's
    /// vocabulary, or the model hashes given with it are wrong.
    #[error(
        "the vocabulary does not belong to model {expected}: together with the given model \
         hashes it hashes to model id {got}; it was tampered with, is from another model, or \
         the hashes are wrong (fetch it again from another peer)"
    )]
    IdMismatch {
        /// The model id that was asked for.
        expected: String,
        /// The id the vocabulary and hashes actually give.
        got: String,
    },

    /// A vocabulary file is malformed (holds tensors, lacks its
    /// `nakshatra.role`, names another source model, ...).
    #[error("invalid vocabulary file: {0}")]
    BadVocab(String),

    /// The [`crate::ModelHashes`] given to [`crate::verify_vocab`] are
    /// malformed or do not fit the vocabulary's metadata (e.g. the wrong
    /// number of block hashes).
    #[error("invalid model hashes: {0}")]
    BadHashes(String),

    /// A piece [`crate::Manifest`] is malformed, is for another model, or
    /// does not agree with its vocabulary file (see
    /// [`crate::Manifest::verify`]).
    #[error("invalid piece manifest: {0}")]
    BadManifest(String),

    /// A file does not hold a piece as the manifest describes it (see
    /// [`crate::piece_segments`]): the file is a slice without that layer,
    /// a non-last slice asked for the embedding or head, a tensor has
    /// another type or shape, ...
    #[error("{} does not hold piece {piece}: {reason}", path.display())]
    PieceNotHeld {
        /// The piece that was asked for.
        piece: PieceId,
        /// The model or slice file that was expected to hold it.
        path: PathBuf,
        /// Why the file does not hold it (missing layer, other type or
        /// shape, ...).
        reason: String,
    },

    /// Bytes received for a piece are not the piece (see
    /// [`crate::PieceHasher`]): wrong length or wrong content.
    #[error(
        "piece {piece} failed verification: expected {expected}, got {got}; the data is \
         damaged or not from this model (fetch the piece again from another peer)"
    )]
    PieceMismatch {
        /// The piece whose received bytes failed verification.
        piece: PieceId,
        /// What the manifest says: `"<n> bytes"` when the length is wrong,
        /// else `"BLAKE3 <64 hex>"`.
        expected: String,
        /// What was received, in the same form.
        got: String,
    },

    /// A piece file given to [`crate::write_slice_from_pieces`] cannot be
    /// used (missing, unreadable, or not the piece's length).
    #[error("piece file {} for piece {piece} is unusable: {reason}", path.display())]
    PieceFile {
        /// The piece the file was given for.
        piece: PieceId,
        /// The unusable piece file.
        path: PathBuf,
        /// What is wrong: cannot open, stat or map it, or its length is not
        /// the piece's.
        reason: String,
    },

    /// The output path is the input file.
    #[error("refusing to overwrite the input model {} with a slice", path.display())]
    OutputIsInput {
        /// The output path, which names an input file.
        path: PathBuf,
    },

    /// Creating, writing, syncing or renaming an output file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file being created, written, synced, renamed or removed (for
        /// the output, its temporary file until the rename).
        path: PathBuf,
        /// What the OS reported.
        #[source]
        source: io::Error,
    },

    /// Producing the GGUF bytes failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The temporary output file being written.
        path: PathBuf,
        /// The writer's complaint: bad metadata or an inconsistent tensor.
        #[source]
        source: WriteError,
    },
}
