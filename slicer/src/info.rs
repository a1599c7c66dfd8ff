//! Model inspection: shape, content hashes and the content-derived model id.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SliceError;
use crate::gguf::read::{Gguf, TensorInfo};
use crate::gguf::value::MetaValue;
use crate::hash::{hash_tensors, model_id, IdParts};
use crate::keys;

/// Summary of a model (or slice) file, with content hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Content-derived model id: 64 hex characters of BLAKE3 (scheme in
    /// [`crate::hash`]). Independent of the file
    /// name. For a slice this is the slice's own id; see [`ModelInfo::slice`]
    /// for the model it was cut from.
    pub id: String,
    /// `general.architecture`, e.g. `"llama"`.
    pub arch: String,
    /// The model's human name, `base:tag` (`smollm2:135m-q4_1`), from its
    /// `general.*` metadata ([`crate::model_name`]); not covered by the id.
    pub name: String,
    /// Number of transformer blocks in this file (`{arch}.block_count`).
    pub n_layers: u32,
    /// Hidden size (`{arch}.embedding_length`).
    pub n_embd: u32,
    /// Vocabulary size: `{arch}.vocab_size`, else the length of
    /// `tokenizer.ggml.tokens`, else the second dim of `token_embd.weight`.
    /// 1 for a non-last slice.
    pub n_vocab: u32,
    /// Whether the output head reuses the token embedding (no
    /// `output.weight` tensor).
    pub tied_embeddings: bool,
    /// Bytes of tensor data in each block, by layer.
    pub block_bytes: Vec<u64>,
    /// BLAKE3 (hex) of each block's tensors, by layer; equal weights hash
    /// equal at any layer index.
    pub block_hashes: Vec<String>,
    /// BLAKE3 (hex) of `token_embd.weight`.
    pub embd_hash: String,
    /// BLAKE3 (hex) of `output.weight`; `None` when tied.
    pub head_hash: Option<String>,
    /// BLAKE3 (hex) of every other non-block tensor (`output_norm.weight`,
    /// `rope_freqs.weight`, `output.bias`, ...).
    pub globals_hash: String,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Set when the file is a slice written by this crate.
    pub slice: Option<SliceMeta>,
}

/// Where a slice file came from (its `nakshatra.*` metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceMeta {
    /// Id of the full model the slice was cut from.
    pub source_id: String,
    /// First layer of the source model in the slice.
    pub start: u32,
    /// One past the last layer of the source model in the slice.
    pub end: u32,
    /// Number of layers of the source model.
    pub n_layers_total: u32,
}

/// Opens a GGUF model (or slice) and computes its [`ModelInfo`]; reads and
/// hashes all tensor data.
pub fn inspect(path: &Path) -> Result<ModelInfo, SliceError> {
    let g = Gguf::open(path)?;
    model_info(&g)
}

/// What a GGUF's header says about its layers, read without touching the
/// tensor data (see [`model_layers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLayers {
    /// `general.architecture`, one of the supported ones.
    pub arch: String,
    /// Transformer blocks in this file (`{arch}.block_count`, checked
    /// against the tensor count).
    pub n_layers: u32,
}

/// The architecture and layer count of a GGUF from its header alone: the
/// cheap check before anything is hashed or loaded. The architecture must
/// be supported, and the layer count is sanity-checked as [`inspect`]
/// checks it.
pub fn model_layers(path: &Path) -> Result<HeaderLayers, SliceError> {
    header_layers(&Gguf::open(path)?)
}

/// [`model_layers`] of a GGUF already open.
pub fn header_layers(g: &Gguf) -> Result<HeaderLayers, SliceError> {
    let arch = arch_of(g)?;
    crate::supported_arch(&arch)?;
    let n_layers = n_layers_of(g, &arch)?;
    Ok(HeaderLayers { arch, n_layers })
}

/// Where a tensor belongs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TensorKind<'a> {
    /// `blk.{layer}.{suffix}`.
    Block { layer: u32, suffix: &'a str },
    /// `token_embd.weight`.
    Embd,
    /// `output.weight`.
    Head,
    /// Any other tensor (output norm, rope factors, ...): the globals
    /// group, which slices copy.
    Global,
}

/// The name of the token embedding tensor.
pub(crate) const EMBD: &str = "token_embd.weight";
/// The name of the untied output head tensor.
pub(crate) const HEAD: &str = "output.weight";

/// Classifies a tensor name. A name starting with `blk.` must have a
/// canonical decimal layer index followed by `.` and a suffix.
pub(crate) fn classify(name: &str) -> Result<TensorKind<'_>, SliceError> {
    if let Some(rest) = name.strip_prefix("blk.") {
        let parsed = rest.split_once('.').and_then(|(idx, suffix)| {
            let layer: u32 = idx.parse().ok()?;
            (layer.to_string() == idx && !suffix.is_empty()).then_some((layer, suffix))
        });
        return match parsed {
            Some((layer, suffix)) => Ok(TensorKind::Block { layer, suffix }),
            None => Err(SliceError::BadModel(format!(
                "tensor name '{name}' starts with 'blk.' but has no valid layer index"
            ))),
        };
    }
    Ok(match name {
        EMBD => TensorKind::Embd,
        HEAD => TensorKind::Head,
        _ => TensorKind::Global,
    })
}

/// `general.architecture`.
pub(crate) fn arch_of(g: &Gguf) -> Result<String, SliceError> {
    match g.get(keys::ARCH) {
        None => Err(SliceError::MissingKey(keys::ARCH.into())),
        Some(MetaValue::String(s)) => Ok(s.clone()),
        Some(v) => Err(bad_key(
            keys::ARCH,
            format!("expected a string, found {}", v.brief()),
        )),
    }
}

/// A required non-negative integer key that fits in `u32`.
pub(crate) fn get_u32(g: &Gguf, key: &str) -> Result<u32, SliceError> {
    let v = g
        .get(key)
        .ok_or_else(|| SliceError::MissingKey(key.into()))?;
    v.as_u32().ok_or_else(|| {
        bad_key(
            key,
            format!(
                "expected a non-negative integer below 2^32, found {}",
                v.brief()
            ),
        )
    })
}

pub(crate) fn bad_key(key: &str, reason: String) -> SliceError {
    SliceError::BadKey {
        key: key.into(),
        reason,
    }
}

/// `{arch}.block_count`, checked against the tensor count so that a corrupt
/// value cannot cause a huge allocation.
pub(crate) fn n_layers_of(g: &Gguf, arch: &str) -> Result<u32, SliceError> {
    let key = format!("{arch}.block_count");
    let n = get_u32(g, &key)?;
    if n as usize > g.tensors().len() {
        return Err(bad_key(
            &key,
            format!(
                "{n} layers cannot exist in a file with only {} tensors",
                g.tensors().len()
            ),
        ));
    }
    Ok(n)
}

/// The slice provenance keys, if present.
fn slice_meta(g: &Gguf) -> Result<Option<SliceMeta>, SliceError> {
    let source_id = match g.get(keys::SOURCE_MODEL_ID) {
        None => return Ok(None),
        Some(MetaValue::String(s)) => s.clone(),
        Some(v) => {
            return Err(bad_key(
                keys::SOURCE_MODEL_ID,
                format!("expected a string, found {}", v.brief()),
            ))
        }
    };
    Ok(Some(SliceMeta {
        source_id,
        start: get_u32(g, keys::LAYER_START)?,
        end: get_u32(g, keys::LAYER_END)?,
        n_layers_total: get_u32(g, keys::N_LAYERS_TOTAL)?,
    }))
}

/// The tensors of a model sorted into the groups that [`ModelInfo`]'s hashes
/// cover, with the shape values `inspect` reports. Each group lists
/// `(canonical name, tensor)` sorted by canonical name, the order
/// [`hash_tensors`] hashes them in (block tensors are named `blk.N.*`).
pub(crate) struct Groups<'a> {
    pub arch: String,
    pub n_layers: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub blocks: Vec<Vec<(String, &'a TensorInfo)>>,
    pub embd: &'a TensorInfo,
    pub head: Option<&'a TensorInfo>,
    pub globals: Vec<(String, &'a TensorInfo)>,
}

/// Sorts the tensors of `g` into [`Groups`] (no data is read).
pub(crate) fn group_tensors(g: &Gguf) -> Result<Groups<'_>, SliceError> {
    let arch = arch_of(g)?;
    let n_layers = n_layers_of(g, &arch)?;
    let n_embd = get_u32(g, &format!("{arch}.embedding_length"))?;
    let embd = g
        .tensor(EMBD)
        .ok_or_else(|| SliceError::MissingTensor(EMBD.into()))?;
    let n_vocab = n_vocab_of(g, &arch, embd)?;

    let mut blocks: Vec<Vec<(String, &TensorInfo)>> = vec![Vec::new(); n_layers as usize];
    let mut globals = Vec::new();
    let mut head = None;
    for t in g.tensors() {
        match classify(&t.name)? {
            TensorKind::Block { layer, suffix } => match blocks.get_mut(layer as usize) {
                Some(b) => b.push((format!("blk.N.{suffix}"), t)),
                None => {
                    return Err(SliceError::BadModel(format!(
                        "tensor '{}' belongs to layer {layer}, but the model has {n_layers} layers",
                        t.name
                    )))
                }
            },
            TensorKind::Embd => {}
            TensorKind::Head => head = Some(t),
            TensorKind::Global => globals.push((t.name.clone(), t)),
        }
    }
    if let Some(i) = blocks.iter().position(Vec::is_empty) {
        return Err(SliceError::MissingTensor(format!(
            "blk.{i}.* (layer {i} has no tensors)"
        )));
    }
    for b in &mut blocks {
        b.sort_by(|a, b| a.0.cmp(&b.0));
    }
    globals.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Groups {
        arch,
        n_layers,
        n_embd,
        n_vocab,
        blocks,
        embd,
        head,
        globals,
    })
}

/// Computes the [`ModelInfo`] of an open file.
pub(crate) fn model_info(g: &Gguf) -> Result<ModelInfo, SliceError> {
    let groups = group_tensors(g)?;
    model_info_of(g, &groups)
}

/// Computes the [`ModelInfo`] of an open file from its [`Groups`]: reads and
/// hashes all tensor data once.
pub(crate) fn model_info_of(g: &Gguf, groups: &Groups<'_>) -> Result<ModelInfo, SliceError> {
    let block_bytes = groups
        .blocks
        .iter()
        .map(|b| b.iter().fold(0u64, |s, (_, t)| s.saturating_add(t.n_bytes)))
        .collect();
    let block_hashes: Vec<blake3::Hash> = groups
        .blocks
        .iter()
        .map(|b| hash_tensors(g, b.clone()))
        .collect();
    let embd_hash = hash_tensors(g, vec![(EMBD.to_string(), groups.embd)]);
    let head_hash = groups
        .head
        .map(|t| hash_tensors(g, vec![(HEAD.to_string(), t)]));
    let globals_hash = hash_tensors(g, groups.globals.clone());

    let id = model_id(&IdParts {
        arch: &groups.arch,
        n_layers: groups.n_layers,
        n_embd: groups.n_embd,
        n_vocab: groups.n_vocab,
        metadata: g.metadata(),
        embd: embd_hash,
        head: head_hash,
        globals: globals_hash,
        blocks: &block_hashes,
    });
    Ok(ModelInfo {
        id,
        n_layers: groups.n_layers,
        n_embd: groups.n_embd,
        n_vocab: groups.n_vocab,
        tied_embeddings: groups.head.is_none(),
        block_bytes,
        block_hashes: block_hashes
            .iter()
            .map(|h| h.to_hex().to_string())
            .collect(),
        embd_hash: embd_hash.to_hex().to_string(),
        head_hash: head_hash.map(|h| h.to_hex().to_string()),
        globals_hash: globals_hash.to_hex().to_string(),
        file_bytes: g.file_len(),
        slice: slice_meta(g)?,
        name: crate::model_name(g.metadata(), &groups.arch),
        arch: groups.arch.clone(),
    })
}

/// The vocabulary size as far as metadata alone tells it:
/// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`, else
/// `None`. The first two steps of [`ModelInfo::n_vocab`]'s rule, shared by
/// [`model_info`] and [`crate::verify_vocab`] so both derive it identically.
pub(crate) fn n_vocab_from_metadata(g: &Gguf, arch: &str) -> Result<Option<u32>, SliceError> {
    let key = format!("{arch}.vocab_size");
    if g.get(&key).is_some() {
        return get_u32(g, &key).map(Some);
    }
    if let Some(v) = g.get(TOKENS) {
        let n = v
            .as_array()
            .map(|a| a.len())
            .ok_or_else(|| bad_key(TOKENS, "expected an array".to_string()))?;
        return u32::try_from(n)
            .map(Some)
            .map_err(|_| bad_key(TOKENS, format!("{n} tokens is too many")));
    }
    Ok(None)
}

/// The metadata key of the token list, whose length is the vocabulary size.
pub(crate) const TOKENS: &str = "tokenizer.ggml.tokens";

fn n_vocab_of(g: &Gguf, arch: &str, embd: &TensorInfo) -> Result<u32, SliceError> {
    if let Some(n) = n_vocab_from_metadata(g, arch)? {
        return Ok(n);
    }
    let key = format!("{arch}.vocab_size");
    embd.dims
        .get(1)
        .and_then(|&d| u32::try_from(d).ok())
        .ok_or_else(|| {
            SliceError::BadModel(format!(
                "cannot tell the vocabulary size: no {key}, no tokenizer.ggml.tokens, \
                 and {EMBD} has shape {:?}",
                embd.dims
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names() {
        assert_eq!(
            classify("blk.12.attn_q.weight").unwrap(),
            TensorKind::Block {
                layer: 12,
                suffix: "attn_q.weight"
            }
        );
        assert_eq!(classify("token_embd.weight").unwrap(), TensorKind::Embd);
        assert_eq!(classify("output.weight").unwrap(), TensorKind::Head);
        assert_eq!(classify("output_norm.weight").unwrap(), TensorKind::Global);
        assert_eq!(classify("rope_freqs.weight").unwrap(), TensorKind::Global);
        for bad in [
            "blk.x.a", "blk.01.a", "blk.1", "blk.1.", "blk.-1.a", "blk.+1.a",
        ] {
            assert!(classify(bad).is_err(), "{bad}");
        }
    }
}
