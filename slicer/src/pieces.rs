//! Pieces: a model cut into independently verifiable parts, so that a node
//! without the model file can fetch exactly the layers it will serve from
//! peers and check every byte against the model id.
//!
//! A model is split into the groups its id already hashes (see
//! [`crate::hash`]): one [`PieceId::Block`] per layer, the token embedding
//! ([`PieceId::Embd`]), the untied output head ([`PieceId::Head`], absent
//! when tied) and every other non-block tensor ([`PieceId::Globals`]). A
//! piece's **byte stream** is the data of its tensors concatenated, without
//! padding, in the order of [`Piece::tensors`] (sorted by canonical name,
//! the order the group hash covers them in), and its hash is exactly the
//! corresponding [`ModelInfo`](crate::ModelInfo) hash.
//!
//! The flow:
//! 1. A node holding the model (or slices of it) computes the [`Manifest`]
//!    and vocabulary file with [`manifest_and_vocab`], and serves pieces with
//!    [`piece_segments`] (from the full model, a slice or an embedding
//!    sidecar; [`pieces_held`] says which).
//! 2. A new node fetches the manifest and vocabulary from any peer and
//!    checks them with [`Manifest::verify`] against the model id it trusts;
//!    this authenticates every piece hash.
//! 3. It fetches the pieces of its range ([`Manifest::pieces_for_range`])
//!    from peers, verifying each stream with a [`PieceHasher`] as it
//!    arrives, and stores each piece as a file holding its byte stream.
//! 4. [`write_slice_from_pieces`] writes the slice (and sidecar), byte for
//!    byte what [`write_slice`](crate::write_slice) writes from the model.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blake3::Hasher;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::SliceError;
use crate::gguf::read::{Gguf, TensorInfo};
use crate::gguf::types::tensor_n_bytes;
use crate::gguf::value::MetaValue;
use crate::gguf::MAX_DIMS;
use crate::hash::tensor_header;
use crate::info::{classify, get_u32, group_tensors, model_info_of, TensorKind, EMBD, HEAD};
use crate::keys;
use crate::slice::{
    check_range, is_same_file, supported_arch, write_slice_files, SliceOutput, SliceSource,
    SrcTensor,
};
use crate::vocab::{check_original_with_tokens, verify_vocab, vocab_bytes, ModelHashes};
use crate::VOCAB_ROLE;

/// Largest `general.alignment` [`write_slice_from_pieces`] accepts from a
/// vocabulary file. `general.*` keys are outside the model id, so a peer
/// could otherwise make every tensor pad to gigabytes.
pub const MAX_PIECES_ALIGNMENT: u64 = 64 * 1024;

/// The canonical name prefix of block tensors in a piece.
const BLOCK_PREFIX: &str = "blk.N.";

/// Which part of a model a [`Piece`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PieceId {
    /// Every `blk.{i}.*` tensor of layer `i` (hash:
    /// [`ModelInfo::block_hashes`](crate::ModelInfo::block_hashes)`[i]`).
    Block(u32),
    /// `token_embd.weight` (hash: `embd_hash`).
    Embd,
    /// `output.weight`, the untied output head (hash: `head_hash`); a model
    /// with tied embeddings has none.
    Head,
    /// Every other non-block tensor: `output_norm.weight`,
    /// `rope_freqs.weight`, `output.bias`, ... (hash: `globals_hash`).
    Globals,
}

impl fmt::Display for PieceId {
    /// `blk.3`, `token_embd`, `output` or `globals`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PieceId::Block(i) => write!(f, "blk.{i}"),
            PieceId::Embd => f.write_str("token_embd"),
            PieceId::Head => f.write_str("output"),
            PieceId::Globals => f.write_str("globals"),
        }
    }
}

/// One tensor of a [`Piece`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceTensor {
    /// Canonical name, as the group hash covers it: block tensors as
    /// `blk.N.<suffix>` (e.g. `blk.N.attn_q.weight`), others by their name.
    pub name: String,
    /// ggml type id (`enum ggml_type`), as in the source model.
    pub ggml_type: u32,
    /// Shape in ggml order (innermost dimension first).
    pub dims: Vec<u64>,
    /// Data bytes (implied by type and shape).
    pub n_bytes: u64,
    /// Position of the tensor in the source model file's tensor list, so
    /// that [`write_slice_from_pieces`] lays tensors out exactly as
    /// [`write_slice`](crate::write_slice) does. Not covered by the model id
    /// (only the layout depends on it).
    pub index: u32,
}

/// A verifiable part of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Which part of the model this is: one block, the embedding, the head
    /// or the other globals.
    pub id: PieceId,
    /// BLAKE3 (64 lowercase hex) of the piece: the corresponding
    /// [`ModelInfo`](crate::ModelInfo) group hash.
    pub hash: String,
    /// Length of the piece's byte stream: the sum of its tensors' `n_bytes`.
    pub n_bytes: u64,
    /// The tensors, in byte-stream order (sorted by canonical name).
    pub tensors: Vec<PieceTensor>,
}

/// Everything a node needs to fetch and check a model piece by piece.
///
/// Pieces are listed in a fixed order: [`PieceId::Embd`],
/// [`PieceId::Block`] `0..n_layers`, [`PieceId::Globals`], then
/// [`PieceId::Head`] unless the embeddings are tied. A manifest from an
/// untrusted peer is checked with [`Manifest::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model id ([`ModelInfo::id`](crate::ModelInfo::id)).
    pub model_id: String,
    /// `general.architecture`.
    pub arch: String,
    /// Number of layers (blocks) of the whole model; there is one
    /// [`PieceId::Block`] per layer.
    pub n_layers: u32,
    /// Hidden size (width of a hidden state, `embedding_length`).
    pub n_embd: u32,
    /// Vocabulary size (as [`ModelInfo::n_vocab`](crate::ModelInfo::n_vocab)).
    pub n_vocab: u32,
    /// Whether the head reuses the token embedding (no [`PieceId::Head`]).
    pub tied_embeddings: bool,
    /// The pieces, in the order described above.
    pub pieces: Vec<Piece>,
    /// BLAKE3 (64 lowercase hex) of the vocabulary file
    /// ([`vocab_gguf`](crate::vocab_gguf)).
    pub vocab_hash: String,
    /// Length of the vocabulary file.
    pub vocab_bytes: u64,
}

/// The [`Manifest`] of the original model at `src`. Reads and hashes the
/// whole model; see [`manifest_and_vocab`] for the refusals.
pub fn manifest(src: &Path) -> Result<Manifest, SliceError> {
    manifest_and_vocab(src).map(|(m, _)| m)
}

/// The [`Manifest`] of the original model at `src` and its vocabulary file
/// (the bytes of [`vocab_gguf`](crate::vocab_gguf)), from one pass over the
/// tensor data. The manifest is checked with [`Manifest::verify`] before it
/// is returned.
///
/// Like [`vocab_gguf`](crate::vocab_gguf) it refuses files made by
/// nakshatra (slices, sidecars, vocabulary files:
/// [`SliceError::NotOriginalModel`]) and models without
/// `tokenizer.ggml.tokens` ([`SliceError::MissingKey`]).
pub fn manifest_and_vocab(src: &Path) -> Result<(Manifest, Vec<u8>), SliceError> {
    let t0 = Instant::now();
    let g = Gguf::open(src)?;
    check_original_with_tokens(&g, src)?;
    let groups = group_tensors(&g)?;
    let info = model_info_of(&g, &groups)?;
    let vocab = vocab_bytes(&g, &info, src)?;

    let positions: std::collections::HashMap<&str, u32> = g
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| Ok((t.name.as_str(), u32::try_from(i)?)))
        .collect::<Result<_, std::num::TryFromIntError>>()
        .map_err(|_| SliceError::BadModel("too many tensors".into()))?;
    let piece = |id: PieceId, hash: &str, items: &[(String, &TensorInfo)]| Piece {
        id,
        hash: hash.to_string(),
        n_bytes: items
            .iter()
            .fold(0u64, |s, (_, t)| s.saturating_add(t.n_bytes)),
        tensors: items
            .iter()
            .map(|(name, t)| PieceTensor {
                name: name.clone(),
                ggml_type: t.ggml_type,
                dims: t.dims.clone(),
                n_bytes: t.n_bytes,
                index: positions.get(t.name.as_str()).copied().unwrap_or(u32::MAX),
            })
            .collect(),
    };
    let mut pieces = Vec::with_capacity(groups.blocks.len() + 3);
    pieces.push(piece(
        PieceId::Embd,
        &info.embd_hash,
        &[(EMBD.to_string(), groups.embd)],
    ));
    for (i, (b, h)) in groups.blocks.iter().zip(&info.block_hashes).enumerate() {
        pieces.push(piece(PieceId::Block(i as u32), h, b));
    }
    pieces.push(piece(PieceId::Globals, &info.globals_hash, &groups.globals));
    if let (Some(t), Some(h)) = (groups.head, &info.head_hash) {
        pieces.push(piece(PieceId::Head, h, &[(HEAD.to_string(), t)]));
    }
    let m = Manifest {
        model_id: info.id.clone(),
        arch: info.arch.clone(),
        n_layers: info.n_layers,
        n_embd: info.n_embd,
        n_vocab: info.n_vocab,
        tied_embeddings: info.tied_embeddings,
        pieces,
        vocab_hash: blake3::hash(&vocab).to_hex().to_string(),
        vocab_bytes: vocab.len() as u64,
    };
    m.verify(&info.id, &vocab).map_err(|e| {
        SliceError::BadModel(format!(
            "internal error: the piece manifest of {} does not verify: {e}",
            src.display()
        ))
    })?;
    tracing::debug!(
        src = %src.display(),
        id = %m.model_id,
        pieces = m.pieces.len(),
        ms = t0.elapsed().as_millis() as u64,
        "built piece manifest"
    );
    Ok((m, vocab))
}

impl Manifest {
    /// The model hashes the manifest states (for [`verify_vocab`]): each
    /// piece's hash in its role, blocks in list order. A missing embedding
    /// or globals piece gives an empty hash (which never verifies).
    pub fn hashes(&self) -> ModelHashes {
        let hash = |id: PieceId| self.piece(&id).map(|p| p.hash.clone());
        ModelHashes {
            n_layers: self.n_layers,
            embd_hash: hash(PieceId::Embd).unwrap_or_default(),
            head_hash: hash(PieceId::Head),
            globals_hash: hash(PieceId::Globals).unwrap_or_default(),
            block_hashes: self
                .pieces
                .iter()
                .filter(|p| matches!(p.id, PieceId::Block(_)))
                .map(|p| p.hash.clone())
                .collect(),
        }
    }

    /// The piece with this id, or `None` if the manifest lists none (e.g.
    /// [`PieceId::Head`] of a model with tied embeddings).
    pub fn piece(&self, id: &PieceId) -> Option<&Piece> {
        self.pieces.iter().find(|p| p.id == *id)
    }

    /// Checks that this manifest and `vocab` (a vocabulary file) describe
    /// the model `model_id`, which must come from a trusted source:
    ///
    /// - the manifest is well formed: `model_id` is the one asked for; the
    ///   pieces are exactly Embd, Block `0..n_layers`, Globals and, iff not
    ///   `tied_embeddings`, Head, in that order; every hash is 64 lowercase
    ///   hex; every tensor's name fits its piece (`blk.N.*` in a block,
    ///   `token_embd.weight` / `output.weight` alone in Embd / Head, neither
    ///   nor a block name in Globals), names are strictly ascending, types
    ///   are known, shapes valid and `n_bytes` what type and shape imply,
    ///   each piece's `n_bytes` is their sum, and the `index`es are a
    ///   permutation of `0..(number of tensors)`;
    /// - `vocab` is `vocab_bytes` long and hashes to `vocab_hash`;
    /// - [`verify_vocab`]`(vocab, model_id, &self.hashes())` passes, so the
    ///   model id authenticates the vocabulary and every piece hash (they
    ///   are all hashed into it);
    /// - `arch`, `n_layers`, `n_embd` and `n_vocab` equal what the verified
    ///   vocabulary says.
    ///
    /// Once this passes, a piece stream that [`PieceHasher`] accepts is the
    /// model's own. The tensor lists are checked for consistency only: a
    /// wrong name, type or shape (say, two dims swapped) cannot be detected
    /// without the data, but [`PieceHasher`] hashes the listed headers with
    /// the data, so such a piece never verifies. The `index`es (layout only)
    /// and `general.*` metadata of the vocabulary are not authenticated.
    ///
    /// Errors: [`SliceError::BadManifest`], [`SliceError::BadVocab`] (the
    /// vocabulary is not the one the manifest names) and the errors of
    /// [`verify_vocab`] (notably [`SliceError::IdMismatch`]).
    pub fn verify(&self, model_id: &str, vocab: &[u8]) -> Result<(), SliceError> {
        if self.model_id != model_id {
            return Err(bad(format!(
                "it is for model {:?}, not {model_id}",
                truncate(&self.model_id, 80)
            )));
        }
        self.check_structure()?;
        if vocab.len() as u64 != self.vocab_bytes {
            return Err(SliceError::BadVocab(format!(
                "it is {} bytes long, the manifest says {}",
                vocab.len(),
                self.vocab_bytes
            )));
        }
        let got = blake3::hash(vocab).to_hex();
        if got.as_str() != self.vocab_hash {
            return Err(SliceError::BadVocab(format!(
                "its BLAKE3 is {got}, the manifest says {:?}",
                truncate(&self.vocab_hash, 80)
            )));
        }
        let v = verify_vocab(vocab, model_id, &self.hashes())?;
        let differs = |what: &str, ours: &dyn fmt::Debug, theirs: &dyn fmt::Debug| {
            bad(format!(
                "its {what} is {ours:?}, the verified vocabulary says {theirs:?}"
            ))
        };
        if v.arch != self.arch {
            return Err(differs("arch", &self.arch, &v.arch));
        }
        if v.n_layers != self.n_layers {
            return Err(differs("n_layers", &self.n_layers, &v.n_layers));
        }
        if v.n_embd != self.n_embd {
            return Err(differs("n_embd", &self.n_embd, &v.n_embd));
        }
        if v.n_vocab != self.n_vocab {
            return Err(differs("n_vocab", &self.n_vocab, &v.n_vocab));
        }
        Ok(())
    }

    /// The structural checks of [`Manifest::verify`].
    fn check_structure(&self) -> Result<(), SliceError> {
        let n = u64::from(self.n_layers);
        let expected_len = n + 2 + u64::from(!self.tied_embeddings);
        if self.pieces.len() as u64 != expected_len {
            return Err(bad(format!(
                "it lists {} pieces, a model of {n} layers with {} embeddings has {expected_len}",
                self.pieces.len(),
                if self.tied_embeddings {
                    "tied"
                } else {
                    "untied"
                }
            )));
        }
        let mut n_tensors: usize = 0;
        for (pos, p) in self.pieces.iter().enumerate() {
            let want = match pos as u64 {
                0 => PieceId::Embd,
                i if i <= n => PieceId::Block((i - 1) as u32),
                i if i == n + 1 => PieceId::Globals,
                _ => PieceId::Head,
            };
            if p.id != want {
                return Err(bad(format!("piece {pos} is {}, expected {want}", p.id)));
            }
            check_piece(p)?;
            n_tensors += p.tensors.len();
        }
        let mut seen = vec![false; n_tensors];
        for t in self.pieces.iter().flat_map(|p| &p.tensors) {
            match seen.get_mut(t.index as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(bad(format!(
                        "tensor {:?} has index {}, which is repeated or not below the tensor \
                         count {n_tensors}",
                        truncate(&t.name, 80),
                        t.index
                    )))
                }
            }
        }
        Ok(())
    }

    /// The pieces a node needs to write slice `start..end` with
    /// [`write_slice_from_pieces`], in manifest order:
    /// - [`PieceId::Embd`] if `start == 0` (the first slice's sidecar) or
    ///   `end == n_layers` (the last slice keeps `token_embd.weight`, tied or
    ///   not; see [`write_slice`](crate::write_slice));
    /// - [`PieceId::Block`] `start..end`;
    /// - [`PieceId::Globals`] (a non-last slice leaves out `output.bias`,
    ///   but takes the rest);
    /// - [`PieceId::Head`] if `end == n_layers` and the head is untied.
    ///
    /// Errors: [`SliceError::EmptyRange`], [`SliceError::RangeOutOfBounds`].
    pub fn pieces_for_range(&self, start: u32, end: u32) -> Result<Vec<PieceId>, SliceError> {
        check_range(start, end, self.n_layers)?;
        let last = end == self.n_layers;
        let mut ids = Vec::with_capacity((end - start) as usize + 3);
        if start == 0 || last {
            ids.push(PieceId::Embd);
        }
        ids.extend((start..end).map(PieceId::Block));
        ids.push(PieceId::Globals);
        if last && !self.tied_embeddings {
            ids.push(PieceId::Head);
        }
        Ok(ids)
    }

    /// Total bytes of the pieces of slice `start..end`
    /// ([`Manifest::pieces_for_range`]): what a node fetches and stores for
    /// it. 0 for an invalid range.
    pub fn range_bytes(&self, start: u32, end: u32) -> u64 {
        self.pieces_for_range(start, end)
            .unwrap_or_default()
            .iter()
            .filter_map(|id| self.piece(id))
            .fold(0u64, |s, p| s.saturating_add(p.n_bytes))
    }
}

fn bad(msg: String) -> SliceError {
    SliceError::BadManifest(msg)
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// Checks one piece's hash and tensor list (see [`Manifest::verify`]).
fn check_piece(p: &Piece) -> Result<(), SliceError> {
    let id = p.id;
    if p.hash.len() != 64
        || !p
            .hash
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(bad(format!(
            "piece {id}: the hash {:?} is not 64 lowercase hex digits",
            truncate(&p.hash, 80)
        )));
    }
    let fits = |name: &str| match id {
        PieceId::Block(_) => name
            .strip_prefix(BLOCK_PREFIX)
            .is_some_and(|s| !s.is_empty()),
        PieceId::Embd => name == EMBD,
        PieceId::Head => name == HEAD,
        PieceId::Globals => matches!(classify(name), Ok(TensorKind::Global)),
    };
    let sole = matches!(id, PieceId::Embd | PieceId::Head);
    if p.tensors.is_empty() && id != PieceId::Globals || sole && p.tensors.len() > 1 {
        return Err(bad(format!("piece {id} has {} tensors", p.tensors.len())));
    }
    let mut sum: u64 = 0;
    let mut prev: Option<&str> = None;
    for t in &p.tensors {
        let name = truncate(&t.name, 80);
        if !fits(&t.name) {
            return Err(bad(format!(
                "piece {id} cannot hold a tensor named {name:?}"
            )));
        }
        if prev.is_some_and(|q| q >= t.name.as_str()) {
            return Err(bad(format!(
                "piece {id}: tensor {name:?} is out of order or repeated (names must be \
                 strictly ascending)"
            )));
        }
        prev = Some(&t.name);
        if t.dims.len() > MAX_DIMS as usize {
            return Err(bad(format!(
                "piece {id}: tensor {name:?} has {} dims, at most {MAX_DIMS}",
                t.dims.len()
            )));
        }
        match tensor_n_bytes(t.ggml_type, &t.dims) {
            Ok(n) if n == t.n_bytes => {}
            Ok(n) => {
                return Err(bad(format!(
                    "piece {id}: tensor {name:?} says {} bytes, its type {} and shape {:?} \
                     need {n}",
                    t.n_bytes, t.ggml_type, t.dims
                )))
            }
            Err(e) => return Err(bad(format!("piece {id}: tensor {name:?}: {e}"))),
        }
        sum = sum
            .checked_add(t.n_bytes)
            .ok_or_else(|| bad(format!("piece {id} is too large")))?;
    }
    if sum != p.n_bytes {
        return Err(bad(format!(
            "piece {id} says {} bytes, its tensors hold {sum}",
            p.n_bytes
        )));
    }
    Ok(())
}

/// What kind of nakshatra-known file a [`Gguf`] is, for serving pieces.
enum FileKind {
    /// An original model (no `nakshatra.*` metadata).
    Model,
    /// A slice written by [`write_slice`](crate::write_slice).
    Slice { start: u32, end: u32, last: bool },
    /// A first slice's embedding sidecar.
    Sidecar,
}

fn file_kind(g: &Gguf) -> Result<FileKind, String> {
    match g.get(keys::ROLE) {
        Some(MetaValue::String(r)) if r == "token_embd" => return Ok(FileKind::Sidecar),
        Some(MetaValue::String(r)) if r == VOCAB_ROLE => {
            return Err("it is a vocabulary file, which holds no tensors".into())
        }
        Some(v) => return Err(format!("it has the unknown {} {}", keys::ROLE, v.brief())),
        None => {}
    }
    if g.get(keys::LAYER_START).is_some() {
        let get = |k: &str| get_u32(g, k).map_err(|e| format!("it is a broken slice: {e}"));
        let (start, end, total) = (
            get(keys::LAYER_START)?,
            get(keys::LAYER_END)?,
            get(keys::N_LAYERS_TOTAL)?,
        );
        if start >= end || end > total {
            return Err(format!(
                "it is a broken slice: layers {start}..{end} of {total}"
            ));
        }
        return Ok(FileKind::Slice {
            start,
            end,
            last: end == total,
        });
    }
    if g.metadata()
        .iter()
        .any(|(k, _)| k.starts_with("nakshatra."))
    {
        return Err("it has nakshatra metadata but is neither a slice nor a sidecar".into());
    }
    Ok(FileKind::Model)
}

/// The byte stream of `piece` as stored in `g`: one slice of `g`'s data per
/// tensor, in [`Piece::tensors`] order (concatenated, they are the stream a
/// [`PieceHasher`] checks).
///
/// `g` may be the original model, a slice written by
/// [`write_slice`](crate::write_slice) (its `blk.{j}` is source layer
/// `nakshatra.layer_start + j`; only a last slice holds the embedding and
/// head — a non-last slice's zero placeholder `token_embd.weight` is not the
/// embedding — and a non-last slice of a model with `output.bias` lacks part
/// of the globals) or a first slice's embedding sidecar (the embedding
/// only). A split model opened from its first shard (see [`Gguf::open`])
/// serves like the merged file: each segment lies in the shard holding its
/// tensor.
///
/// The file's tensors of that group must be exactly those of the piece,
/// with the same types and shapes, else [`SliceError::PieceNotHeld`]. The
/// data is not hashed here (that is the receiver's job, with
/// [`PieceHasher`]), and the file's model is not checked:
/// [`pieces_held`] checks the `nakshatra.source_model_id` of slices and
/// sidecars.
pub fn piece_segments<'a>(g: &'a Gguf, piece: &Piece) -> Result<Vec<&'a [u8]>, SliceError> {
    let not_held = |reason: String| SliceError::PieceNotHeld {
        piece: piece.id,
        path: g.path().to_path_buf(),
        reason,
    };
    let kind = file_kind(g).map_err(not_held)?;
    // The file's layer holding the piece's block, if any.
    let layer = match (piece.id, &kind) {
        (PieceId::Block(i), FileKind::Model) => Some(i),
        (PieceId::Block(i), FileKind::Slice { start, end, .. }) => {
            if !(*start..*end).contains(&i) {
                return Err(not_held(format!("it is a slice of layers {start}..{end}")));
            }
            Some(i - start)
        }
        (PieceId::Block(_) | PieceId::Head | PieceId::Globals, FileKind::Sidecar) => {
            return Err(not_held(
                "it is an embedding sidecar, which holds only token_embd.weight".into(),
            ))
        }
        (PieceId::Embd | PieceId::Head, FileKind::Slice { last: false, .. }) => {
            return Err(not_held(
                "a slice that is not last has no embedding or output head (its \
                 token_embd.weight is a zero placeholder)"
                    .into(),
            ))
        }
        _ => None,
    };

    let mut found: Vec<(String, &TensorInfo)> = Vec::new();
    for t in g.tensors() {
        let canonical = match (classify(&t.name)?, piece.id) {
            (TensorKind::Block { layer: l, suffix }, PieceId::Block(_)) if Some(l) == layer => {
                format!("{BLOCK_PREFIX}{suffix}")
            }
            (TensorKind::Embd, PieceId::Embd)
            | (TensorKind::Head, PieceId::Head)
            | (TensorKind::Global, PieceId::Globals) => t.name.clone(),
            _ => continue,
        };
        found.push((canonical, t));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    if found.is_empty() && !piece.tensors.is_empty() {
        return Err(not_held(match layer {
            Some(l) => format!("it has no tensors blk.{l}.*"),
            None => "it has none of the piece's tensors".into(),
        }));
    }
    let names = |v: &mut dyn Iterator<Item = &str>| v.collect::<Vec<_>>().join(", ");
    if found.len() != piece.tensors.len()
        || found
            .iter()
            .zip(&piece.tensors)
            .any(|((n, _), t)| *n != t.name)
    {
        return Err(not_held(format!(
            "its tensors are [{}], the piece's are [{}]",
            names(&mut found.iter().map(|(_, t)| t.name.as_str())),
            names(&mut piece.tensors.iter().map(|t| t.name.as_str()))
        )));
    }
    let mut out = Vec::with_capacity(found.len());
    for ((_, t), want) in found.iter().zip(&piece.tensors) {
        if t.ggml_type != want.ggml_type || t.dims != want.dims || t.n_bytes != want.n_bytes {
            return Err(not_held(format!(
                "tensor '{}' has type {} and shape {:?} ({} bytes), the piece's has type {} and \
                 shape {:?} ({} bytes)",
                t.name, t.ggml_type, t.dims, t.n_bytes, want.ggml_type, want.dims, want.n_bytes
            )));
        }
        let data = g.tensor_data(t);
        if data.len() as u64 != t.n_bytes {
            return Err(not_held(format!(
                "the data of tensor '{}' is out of bounds",
                t.name
            )));
        }
        out.push(data);
    }
    Ok(out)
}

/// The pieces of `manifest` that `g` can serve ([`piece_segments`]
/// succeeds), in manifest order. Empty when `g` is a slice or sidecar of
/// another model (its `nakshatra.source_model_id`), or a model or slice of
/// another architecture or layer count. For an original model the check is
/// structural (names, types, shapes), the data is not hashed.
pub fn pieces_held(g: &Gguf, manifest: &Manifest) -> Vec<PieceId> {
    if let Some(id) = g.get(keys::SOURCE_MODEL_ID) {
        if id.as_str() != Some(manifest.model_id.as_str()) {
            return Vec::new();
        }
    }
    if g.get(keys::ARCH).and_then(MetaValue::as_str) != Some(manifest.arch.as_str()) {
        return Vec::new();
    }
    let n_layers = match file_kind(g) {
        Ok(FileKind::Model) => get_u32(g, &format!("{}.block_count", manifest.arch)).ok(),
        Ok(FileKind::Slice { .. }) => get_u32(g, keys::N_LAYERS_TOTAL).ok(),
        Ok(FileKind::Sidecar) => Some(manifest.n_layers),
        Err(_) => None,
    };
    if n_layers != Some(manifest.n_layers) {
        return Vec::new();
    }
    manifest
        .pieces
        .iter()
        .filter(|p| piece_segments(g, p).is_ok())
        .map(|p| p.id)
        .collect()
}

/// Input below this size is gathered before it is hashed: BLAKE3 hashes
/// large inputs many 1 KiB chunks at a time (SIMD), small updates one by
/// one, so without this, 4 KiB network chunks would hash several times
/// slower.
const HASH_BATCH: usize = 256 * 1024;

/// Verifies a piece's byte stream as it arrives, in chunks of any size:
/// it computes the piece's group hash exactly as [`crate::inspect`] does
/// (the tensor headers of [`crate::hash`] interleaved with the data, at the
/// tensor boundaries given by the piece's tensor list), at BLAKE3 speed
/// whatever the chunking (small chunks are batched internally).
///
/// ```no_run
/// # fn fetch(
/// #     manifest: &nakshatra_slicer::Manifest,
/// #     mut stream: impl std::io::Read,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use std::io::Write;
/// use nakshatra_slicer::{PieceHasher, PieceId};
///
/// let piece = manifest.piece(&PieceId::Block(3)).ok_or("no such piece")?;
/// let mut file = std::fs::File::create("blk.3.piece")?;
/// let mut h = PieceHasher::new(piece);
/// let mut buf = vec![0u8; 64 * 1024];
/// loop {
///     let n = stream.read(&mut buf)?;
///     if n == 0 {
///         break;
///     }
///     h.update(&buf[..n]);
///     file.write_all(&buf[..n])?;
/// }
/// h.finalize()?; // only now does the file hold the piece
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PieceHasher {
    id: PieceId,
    expected_hash: String,
    expected_len: u64,
    tensors: Vec<(String, u32, Vec<u64>, u64)>,
    /// The next tensor whose header is not hashed yet.
    next: usize,
    /// Data bytes still due for the current tensor.
    left: u64,
    /// Bytes given to `update`.
    received: u64,
    /// Bytes past the last tensor (never hashed).
    excess: u64,
    /// Hash input not yet given to `hasher` (less than [`HASH_BATCH`]).
    batch: Vec<u8>,
    hasher: Hasher,
}

impl PieceHasher {
    /// A hasher for the stream of `piece` (whose hash, length and tensor
    /// list should come from a verified [`Manifest`]).
    pub fn new(piece: &Piece) -> PieceHasher {
        let mut h = PieceHasher {
            id: piece.id,
            expected_hash: piece.hash.clone(),
            expected_len: piece.n_bytes,
            tensors: piece
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.ggml_type, t.dims.clone(), t.n_bytes))
                .collect(),
            next: 0,
            left: 0,
            received: 0,
            excess: 0,
            batch: Vec::new(),
            hasher: Hasher::new(),
        };
        h.advance();
        h
    }

    /// Hashes `data` (header or tensor bytes), batching small inputs.
    fn feed(&mut self, mut data: &[u8]) {
        if !self.batch.is_empty() {
            let k = (HASH_BATCH - self.batch.len()).min(data.len());
            let (now, rest) = data.split_at(k);
            self.batch.extend_from_slice(now);
            data = rest;
            if self.batch.len() < HASH_BATCH {
                return;
            }
            self.hasher.update(&self.batch);
            self.batch.clear();
        }
        if data.len() >= HASH_BATCH {
            self.hasher.update(data);
        } else if !data.is_empty() {
            if self.batch.capacity() == 0 {
                self.batch.reserve_exact(HASH_BATCH);
            }
            self.batch.extend_from_slice(data);
        }
    }

    /// Hashes the headers of the following tensors until one still expects
    /// data (or none is left).
    fn advance(&mut self) {
        while self.left == 0 {
            let Some((name, ty, dims, n)) = self.tensors.get(self.next) else {
                return;
            };
            let (header, n) = (tensor_header(name, *ty, dims), *n);
            self.feed(&header);
            self.left = n;
            self.next += 1;
        }
    }

    /// Feeds the next bytes of the stream (any chunking).
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.received = self.received.saturating_add(bytes.len() as u64);
        while !bytes.is_empty() {
            if self.left == 0 {
                self.excess = self.excess.saturating_add(bytes.len() as u64);
                return;
            }
            let k = usize::try_from(self.left).map_or(bytes.len(), |l| l.min(bytes.len()));
            let (now, rest) = bytes.split_at(k);
            self.feed(now);
            self.left -= k as u64;
            bytes = rest;
            self.advance();
        }
    }

    /// Bytes fed so far, counting any past the piece's end.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// `Ok` if the stream fed was exactly the piece: [`Piece::n_bytes`]
    /// long, ending at the end of its last tensor, and hashing to
    /// [`Piece::hash`]; else [`SliceError::PieceMismatch`].
    pub fn finalize(mut self) -> Result<(), SliceError> {
        let id = self.id;
        let mismatch = |expected: String, got: String| SliceError::PieceMismatch {
            piece: id,
            expected,
            got,
        };
        let complete = self.left == 0 && self.next == self.tensors.len() && self.excess == 0;
        if self.received != self.expected_len || !complete {
            return Err(mismatch(
                format!("{} bytes", self.expected_len),
                format!("{} bytes", self.received),
            ));
        }
        self.hasher.update(&self.batch);
        let got = self.hasher.finalize().to_hex();
        if got.as_str() != self.expected_hash {
            return Err(mismatch(
                format!("BLAKE3 {}", truncate(&self.expected_hash, 80)),
                format!("BLAKE3 {got}"),
            ));
        }
        Ok(())
    }
}

/// A piece file mapped for [`write_slice_from_pieces`].
struct PieceMap {
    id: PieceId,
    map: Option<Mmap>,
}

impl PieceMap {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Opens and maps the file of `piece` and checks its length.
fn map_piece(piece: &Piece, path: &Path) -> Result<PieceMap, SliceError> {
    let err = |reason: String| SliceError::PieceFile {
        piece: piece.id,
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| err(format!("cannot read its size: {e}")))?
        .len();
    if len != piece.n_bytes {
        return Err(err(format!(
            "it holds {len} bytes, the piece has {}",
            piece.n_bytes
        )));
    }
    let map = if len == 0 {
        None
    } else {
        // SAFETY: memmap2's contract is that the file is not modified or
        // truncated while the map is in use, since the `&[u8]` it hands out
        // would then change or fault under us. We map read-only and never
        // write piece files here; that no one else does during the call is
        // the documented condition of `write_slice_from_pieces`, the same as
        // for `Gguf::open`. The map lives in the returned `PieceMap` and is
        // only read through it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(format!("cannot map it: {e}")))?;
        if map.len() as u64 != piece.n_bytes {
            return Err(err(format!(
                "it changed size to {} bytes while being read",
                map.len()
            )));
        }
        Some(map)
    };
    Ok(PieceMap { id: piece.id, map })
}

/// Writes the layers `start..end` of the model `manifest` describes as a
/// slice at `out` (and, for a first slice, its embedding sidecar) from
/// fetched pieces: byte for byte the files
/// [`write_slice`](crate::write_slice)`(model, start, end, out)` writes
/// from the model file, through the same writer, with the same atomic
/// write (temporary file, sync, rename), stale-sidecar removal, result and
/// errors.
///
/// - `vocab` is the model's vocabulary file; it supplies the metadata (the
///   model's own, in its order; its `nakshatra.*` keys are dropped). Its
///   `general.alignment` must be at most [`MAX_PIECES_ALIGNMENT`].
/// - `piece_file(id)` is the path of a file holding exactly the byte
///   stream of piece `id`, for each id of
///   [`Manifest::pieces_for_range`]`(start, end)`. The caller must have
///   verified the streams ([`PieceHasher`]); here only their lengths are
///   checked ([`SliceError::PieceFile`]), before anything is written. They
///   are memory-mapped: do not modify them during the call.
/// - The manifest is checked first with [`Manifest::verify`] against its
///   own `model_id` (consistency with `vocab`; it only authenticates if the
///   caller verified against a trusted id), then the architecture and
///   range are checked as [`write_slice`](crate::write_slice) does, and
///   `out` must not be one of the piece files
///   ([`SliceError::OutputIsInput`]).
///
/// Tensor infos (order, types, shapes) come from the manifest. As with
/// [`write_slice`](crate::write_slice), the written slice is inspected and
/// its block hashes compared with the manifest's.
pub fn write_slice_from_pieces(
    manifest: &Manifest,
    vocab: &[u8],
    piece_file: &dyn Fn(&PieceId) -> PathBuf,
    start: u32,
    end: u32,
    out: &Path,
) -> Result<SliceOutput, SliceError> {
    let t0 = Instant::now();
    manifest.verify(&manifest.model_id, vocab)?;
    supported_arch(&manifest.arch)?;
    let ids = manifest.pieces_for_range(start, end)?;
    let files: Vec<(&Piece, PathBuf)> = ids
        .iter()
        .map(|id| {
            let p = manifest
                .piece(id)
                .ok_or_else(|| bad(format!("it has no piece {id}")))?;
            Ok((p, piece_file(id)))
        })
        .collect::<Result<_, SliceError>>()?;
    if files.iter().any(|(_, path)| is_same_file(path, out)) {
        return Err(SliceError::OutputIsInput {
            path: out.to_path_buf(),
        });
    }
    let vocab_g = Gguf::from_bytes(
        vocab.to_vec(),
        &format!("vocabulary of model {}", manifest.model_id),
    )?;
    if vocab_g.alignment() > MAX_PIECES_ALIGNMENT {
        return Err(SliceError::BadVocab(format!(
            "its general.alignment is {}, more than the {MAX_PIECES_ALIGNMENT} accepted from a \
             peer",
            vocab_g.alignment()
        )));
    }
    let maps = files
        .iter()
        .map(|(p, path)| map_piece(p, path))
        .collect::<Result<Vec<_>, _>>()?;

    // Every tensor of the model, with data where its piece was given.
    let mut tensors: Vec<(u32, SrcTensor<'_>)> = Vec::new();
    for p in &manifest.pieces {
        let mut data = maps.iter().find(|m| m.id == p.id).map(PieceMap::bytes);
        for t in &p.tensors {
            let name = match (p.id, t.name.strip_prefix(BLOCK_PREFIX)) {
                (PieceId::Block(i), Some(suffix)) => format!("blk.{i}.{suffix}"),
                _ => t.name.clone(),
            };
            let bytes = match data.as_mut() {
                Some(rest) => {
                    // Lengths were checked by verify and map_piece.
                    let k = usize::try_from(t.n_bytes)
                        .ok()
                        .filter(|&k| k <= rest.len())
                        .ok_or_else(|| bad(format!("piece {} overruns its file", p.id)))?;
                    let (now, later) = rest.split_at(k);
                    *rest = later;
                    Some(now)
                }
                None => None,
            };
            tensors.push((
                t.index,
                SrcTensor {
                    name,
                    ggml_type: t.ggml_type,
                    dims: &t.dims,
                    data: bytes,
                },
            ));
        }
    }
    tensors.sort_by_key(|(i, _)| *i);
    let block_hashes = manifest.hashes().block_hashes;
    let source = SliceSource {
        metadata: vocab_g.metadata(),
        arch: &manifest.arch,
        n_layers: manifest.n_layers,
        n_embd: manifest.n_embd,
        source_id: &manifest.model_id,
        block_hashes: &block_hashes,
        tensors: tensors.into_iter().map(|(_, t)| t).collect(),
    };
    let written = write_slice_files(&source, start, end, out)?;
    tracing::info!(
        model = %manifest.model_id,
        out = %written.path.display(),
        start,
        end,
        bytes = written.bytes,
        total_ms = t0.elapsed().as_millis() as u64,
        "wrote slice from pieces"
    );
    Ok(written)
}
