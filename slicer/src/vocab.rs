//! Vocabulary files: a model's tokenizer and chat template, without weights,
//! for a node that has no model file, checked against the model id.

use std::path::Path;

use blake3::Hash;
use serde::{Deserialize, Serialize};

use crate::error::SliceError;
use crate::gguf::read::Gguf;
use crate::gguf::value::MetaValue;
use crate::gguf::write::write_gguf;
use crate::hash::{self, IdParts};
use crate::info::{arch_of, get_u32, model_info, n_vocab_from_metadata, ModelInfo, TOKENS};
use crate::keys;
use crate::slice::FORMAT_VERSION;

/// The `nakshatra.role` of a vocabulary file.
pub const VOCAB_ROLE: &str = "vocab";

/// The tensor hashes and layer count of a model: together with a vocabulary
/// file's metadata, everything its model id is computed from (see
/// [`crate::hash`]). All hashes are 64 hex characters of BLAKE3, as in
/// [`ModelInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHashes {
    /// Number of transformer blocks ([`ModelInfo::n_layers`]).
    pub n_layers: u32,
    /// Hash of `token_embd.weight` ([`ModelInfo::embd_hash`]).
    pub embd_hash: String,
    /// Hash of `output.weight`, `None` when the head is tied
    /// ([`ModelInfo::head_hash`]).
    pub head_hash: Option<String>,
    /// Hash of the other non-block tensors ([`ModelInfo::globals_hash`]).
    pub globals_hash: String,
    /// Hash of each block, by layer ([`ModelInfo::block_hashes`]).
    pub block_hashes: Vec<String>,
}

impl From<&ModelInfo> for ModelHashes {
    fn from(info: &ModelInfo) -> ModelHashes {
        ModelHashes {
            n_layers: info.n_layers,
            embd_hash: info.embd_hash.clone(),
            head_hash: info.head_hash.clone(),
            globals_hash: info.globals_hash.clone(),
            block_hashes: info.block_hashes.clone(),
        }
    }
}

/// The shape of a model as its verified vocabulary file states it (returned
/// by [`verify_vocab`]); derived from the metadata exactly as
/// [`crate::inspect`] derives the same [`ModelInfo`] fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabInfo {
    /// `general.architecture`, e.g. `"llama"`.
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layers: u32,
    /// `{arch}.embedding_length`.
    pub n_embd: u32,
    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`.
    pub n_vocab: u32,
    /// The model's human name ([`crate::model_name`]; the vocabulary file
    /// keeps the model's `general.*` entries, which its id does not cover).
    pub name: String,
}

/// Builds, in memory, the vocabulary file of the model at `src`: a GGUF v3
/// file with every metadata entry of the model — same keys, order, types
/// and values, `{arch}.block_count`, `{arch}.embedding_length` and the other
/// hyperparameters included (llama.cpp's `vocab_only` loader reads them) —
/// followed by `nakshatra.role = "vocab"` ([`VOCAB_ROLE`]),
/// `nakshatra.source_model_id` (the model's id, as [`crate::inspect`] gives
/// it) and `nakshatra.format_version`, and no tensors. This is the shape of
/// llama.cpp's own `ggml-vocab-*.gguf` files, so llama.cpp can load it with
/// `vocab_only` to tokenize and apply the chat template.
///
/// The bytes are deterministic (a function of the model's content and
/// metadata only). A peer checks them with [`verify_vocab`] against the model
/// id and the model's [`ModelHashes`]; the result is checked that way before
/// it is returned.
///
/// Reads and hashes the whole model (to compute its id), so callers serving
/// it repeatedly should keep the bytes.
///
/// Only original models are accepted: a file with `nakshatra.*` metadata (a
/// slice — even a last slice, which has the tokenizer but a cut
/// `block_count` and per-layer arrays — an embedding sidecar or a vocabulary
/// file) gives [`SliceError::NotOriginalModel`], and a model without
/// `tokenizer.ggml.tokens` gives [`SliceError::MissingKey`].
pub fn vocab_gguf(src: &Path) -> Result<Vec<u8>, SliceError> {
    let g = Gguf::open(src)?;
    check_original_with_tokens(&g, src)?;
    let info = model_info(&g)?;
    vocab_bytes(&g, &info, src)
}

/// The input checks of [`vocab_gguf`]: `g` (opened from `src`) must be an
/// original model ([`SliceError::NotOriginalModel`]) with
/// `tokenizer.ggml.tokens` ([`SliceError::MissingKey`]).
pub(crate) fn check_original_with_tokens(g: &Gguf, src: &Path) -> Result<(), SliceError> {
    if g.metadata()
        .iter()
        .any(|(k, _)| k.starts_with("nakshatra."))
    {
        let source_id = g
            .get(keys::SOURCE_MODEL_ID)
            .and_then(MetaValue::as_str)
            .unwrap_or("unknown")
            .to_string();
        return Err(SliceError::NotOriginalModel {
            path: src.to_path_buf(),
            source_id,
        });
    }
    if g.get(TOKENS).is_none() {
        return Err(SliceError::MissingKey(TOKENS.into()));
    }
    Ok(())
}

/// The vocabulary file of the checked original model `g` (opened from
/// `src`) whose [`ModelInfo`] is `info`, verified before it is returned (see
/// [`vocab_gguf`]).
pub(crate) fn vocab_bytes(g: &Gguf, info: &ModelInfo, src: &Path) -> Result<Vec<u8>, SliceError> {
    let mut meta = Vec::with_capacity(g.metadata().len() + 3);
    meta.extend_from_slice(g.metadata());
    meta.push((keys::ROLE.into(), MetaValue::String(VOCAB_ROLE.into())));
    meta.push((
        keys::SOURCE_MODEL_ID.into(),
        MetaValue::String(info.id.clone()),
    ));
    meta.push((keys::FORMAT_VERSION.into(), MetaValue::U32(FORMAT_VERSION)));
    let mut out = Vec::new();
    write_gguf(&mut out, &meta, &[]).map_err(|e| {
        SliceError::BadModel(format!(
            "internal error: cannot encode the vocabulary of {}: {e}",
            src.display()
        ))
    })?;

    verify_vocab(&out, &info.id, &info.into()).map_err(|e| {
        SliceError::BadModel(format!(
            "internal error: the vocabulary of {} does not verify: {e}",
            src.display()
        ))
    })?;
    tracing::debug!(src = %src.display(), id = %info.id, bytes = out.len(), "built vocabulary file");
    Ok(out)
}

/// Checks that `bytes` is the vocabulary file ([`vocab_gguf`]) of the model
/// `model_id`, whose tensor hashes are `hashes`, and returns the model's
/// shape.
///
/// The file is parsed from memory with all of [`Gguf::open`]'s validation
/// (damaged or hostile bytes give an error, never a panic); it must hold no
/// tensors and say `nakshatra.role = "vocab"`. From its metadata, exactly as
/// [`crate::inspect`] does for the model, come `arch`, `n_layers`, `n_embd`
/// and `n_vocab` (`{arch}.vocab_size`, else the number of
/// `tokenizer.ggml.tokens`; [`vocab_gguf`] only accepts models that have
/// tokens, so this is the value `inspect` derives too). `hashes` must have
/// `n_layers` blocks ([`SliceError::BadHashes`]). The model id is then
/// recomputed ([`crate::hash`]) from those values, every metadata entry
/// except `general.*` and `nakshatra.*`, and `hashes`; unless it equals
/// `model_id` (lowercase hex, as [`ModelInfo::id`]) the result is
/// [`SliceError::IdMismatch`]. Finally `nakshatra.source_model_id` must name
/// `model_id`.
///
/// # Why a peer cannot substitute a vocabulary
///
/// The id is BLAKE3 over an unambiguous encoding (length-prefixed strings,
/// counts, GGUF type tags) of, among others, every `tokenizer.*` entry — the
/// tokens, their scores and types, the merges, the special token ids and
/// `add_*` flags, the pre-tokenizer and `tokenizer.chat_template` — and
/// every hyperparameter. So distinct metadata gives distinct hash inputs,
/// and a file that passes with a vocabulary or chat template other than the
/// model's own would be a second BLAKE3 preimage of `model_id`, which is
/// computationally infeasible. This holds whoever supplied `hashes`: they are
/// hashed into the id too, so they may come from the same untrusted peer,
/// and once this returns `Ok` they are authenticated as well (and can be
/// used to check slices of the model). The guarantee is only as good as
/// `model_id`, which must come from a trusted source.
///
/// Not covered: `general.*` entries (name, licence, alignment, ...) are
/// outside the id by design and may differ from the model's; they are
/// labels, not tokenizer data, and must not be relied on. `nakshatra.*`
/// entries are checked for consistency only. Use exactly the bytes that were
/// verified (e.g. write these bytes to the file llama.cpp loads), not a copy
/// fetched again.
pub fn verify_vocab(
    bytes: &[u8],
    model_id: &str,
    hashes: &ModelHashes,
) -> Result<VocabInfo, SliceError> {
    let g = Gguf::from_bytes(bytes.to_vec(), &format!("vocabulary of model {model_id}"))?;
    if !g.tensors().is_empty() {
        return Err(SliceError::BadVocab(format!(
            "it holds {} tensors, a vocabulary file holds none",
            g.tensors().len()
        )));
    }
    match g.get(keys::ROLE) {
        Some(MetaValue::String(r)) if r == VOCAB_ROLE => {}
        Some(v) => {
            return Err(SliceError::BadVocab(format!(
                "{} is {}, expected \"{VOCAB_ROLE}\"",
                keys::ROLE,
                v.brief()
            )))
        }
        None => {
            return Err(SliceError::BadVocab(format!(
                "it has no {} key (not a vocabulary file)",
                keys::ROLE
            )))
        }
    }

    let arch = arch_of(&g)?;
    let n_layers = get_u32(&g, &format!("{arch}.block_count"))?;
    let n_embd = get_u32(&g, &format!("{arch}.embedding_length"))?;
    let n_vocab =
        n_vocab_from_metadata(&g, &arch)?.ok_or_else(|| SliceError::MissingKey(TOKENS.into()))?;

    if hashes.n_layers != n_layers || hashes.block_hashes.len() != n_layers as usize {
        return Err(SliceError::BadHashes(format!(
            "they are for {} layers ({} block hashes), the vocabulary's model has {n_layers}",
            hashes.n_layers,
            hashes.block_hashes.len()
        )));
    }
    let embd = parse_hash("embd_hash", &hashes.embd_hash)?;
    let head = hashes
        .head_hash
        .as_deref()
        .map(|h| parse_hash("head_hash", h))
        .transpose()?;
    let globals = parse_hash("globals_hash", &hashes.globals_hash)?;
    let blocks = hashes
        .block_hashes
        .iter()
        .enumerate()
        .map(|(i, h)| parse_hash(&format!("block_hashes[{i}]"), h))
        .collect::<Result<Vec<_>, _>>()?;

    let got = hash::model_id(&IdParts {
        arch: &arch,
        n_layers,
        n_embd,
        n_vocab,
        metadata: g.metadata(),
        embd,
        head,
        globals,
        blocks: &blocks,
    });
    if got != model_id {
        return Err(SliceError::IdMismatch {
            expected: model_id.to_string(),
            got,
        });
    }
    match g.get(keys::SOURCE_MODEL_ID) {
        Some(MetaValue::String(s)) if s == model_id => {}
        v => {
            return Err(SliceError::BadVocab(format!(
                "{} is {}, expected \"{model_id}\"",
                keys::SOURCE_MODEL_ID,
                match v {
                    None => "missing".to_string(),
                    Some(MetaValue::String(s)) => format!("{:?}", truncate(s, 80)),
                    Some(v) => v.brief(),
                }
            )))
        }
    }
    Ok(VocabInfo {
        name: crate::model_name(g.metadata(), &arch),
        arch,
        n_layers,
        n_embd,
        n_vocab,
    })
}

pub(crate) fn parse_hash(field: &str, hex: &str) -> Result<Hash, SliceError> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(SliceError::BadHashes(format!(
            "{field} must be 64 lowercase hex digits, found {:?}",
            truncate(hex, 80)
        )));
    }
    Hash::from_hex(hex).map_err(|e| SliceError::BadHashes(format!("{field}: {e}")))
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}
