//! Content hashes: per-tensor-group BLAKE3 hashes and the model id.
//!
//! Everything here is a pure function of tensor names, types, shapes, data
//! and metadata values, never of file names, file layout, tensor order in
//! the file or (for a split model) which shard holds a tensor, so equal
//! content gives equal hashes.
//!
//! **Tensor group hash** (a block, the embedding, the head, the globals):
//! BLAKE3 over the group's tensors sorted by (canonical) name, each encoded
//! as
//! - name: `u64` LE byte length + UTF-8 bytes; in a block hash the prefix
//!   `blk.{i}.` is replaced by `blk.N.`, so a layer hashes the same at any
//!   index (in the full model and in every slice containing it);
//! - ggml type: `u32` LE;
//! - `n_dims`: `u32` LE, then each dim as `u64` LE;
//! - the data bytes (their length follows from type and shape).
//!
//! Each group is a piece ([`crate::pieces`]); a piece's byte stream is the
//! data bytes alone, and [`crate::PieceHasher`] puts the headers back in from
//! the piece's tensor list.
//!
//! **Model id**: BLAKE3 over [`ID_DOMAIN`], then
//! `str(arch)`, `u32 n_layers`, `u32 n_embd`, `u32 n_vocab`, `u64` count of
//! the metadata entries that take part, and each of them sorted by key as
//! `str(key)` + `u32` GGUF type tag + the GGUF-encoded value (an array is its
//! element tag, `u64` count and elements) — every key except `general.*`
//! (names, licences, alignment: not content), `nakshatra.*` (our own
//! bookkeeping) and `split.*` (how llama.cpp's gguf-split cut the model
//! into files: layout, not content); then the 32 raw bytes of the embedding hash, a byte `0` (no
//! head) or `1` followed by the 32 bytes of the head hash, the 32 bytes of the
//! globals hash, a `u64` block count and each block hash's 32 bytes in layer
//! order. `str(x)` is a `u64` LE length followed by the bytes. The id is the
//! lowercase hex of the hash (64 characters).

use blake3::{Hash, Hasher};

use crate::gguf::read::{Gguf, TensorInfo};
use crate::gguf::value::MetaValue;

/// Prefix that starts every model-id preimage (versions the scheme).
pub const ID_DOMAIN: &[u8] = b"nakshatra model id v1\0";

/// Hashes a group of tensors of `g`. Each item is the name to hash under
/// (already canonicalised by the caller) and the tensor.
pub(crate) fn hash_tensors(g: &Gguf, mut items: Vec<(String, &TensorInfo)>) -> Hash {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Hasher::new();
    for (name, t) in items {
        update_tensor_header(&mut h, &name, t.ggml_type, &t.dims);
        h.update(g.tensor_data(t));
    }
    h.finalize()
}

/// Feeds the header that precedes a tensor's data in a group hash (see
/// [`tensor_header`]).
fn update_tensor_header(h: &mut Hasher, name: &str, ggml_type: u32, dims: &[u64]) {
    h.update(&tensor_header(name, ggml_type, dims));
}

/// The header that precedes a tensor's data in a group hash: name, ggml
/// type, `n_dims` and the dims. Shared by [`hash_tensors`] and
/// [`crate::PieceHasher`], so both encode a group identically.
pub(crate) fn tensor_header(name: &str, ggml_type: u32, dims: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + name.len() + 8 + 8 * dims.len());
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&ggml_type.to_le_bytes());
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b
}

/// The parts of a model that its id is computed from.
pub(crate) struct IdParts<'a> {
    pub arch: &'a str,
    pub n_layers: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub metadata: &'a [(String, MetaValue)],
    pub embd: Hash,
    pub head: Option<Hash>,
    pub globals: Hash,
    pub blocks: &'a [Hash],
}

/// Whether a metadata key takes part in the model id: not `general.*`,
/// `nakshatra.*` or `split.*` (how a model is split into files, see
/// [`crate::Gguf`]; never shown by a `Gguf`, excluded here as well so that a
/// sharded model, its merged file and any metadata list built by hand agree).
pub(crate) fn key_in_id(key: &str) -> bool {
    !key.starts_with("general.")
        && !key.starts_with("nakshatra.")
        && !key.starts_with(crate::gguf::read::SPLIT_PREFIX)
}

/// Computes the model id (64 lowercase hex characters).
pub(crate) fn model_id(p: &IdParts<'_>) -> String {
    let mut h = Hasher::new();
    h.update(ID_DOMAIN);
    update_str(&mut h, p.arch);
    h.update(&p.n_layers.to_le_bytes());
    h.update(&p.n_embd.to_le_bytes());
    h.update(&p.n_vocab.to_le_bytes());
    let mut kvs: Vec<&(String, MetaValue)> =
        p.metadata.iter().filter(|(k, _)| key_in_id(k)).collect();
    kvs.sort_by(|a, b| a.0.cmp(&b.0));
    h.update(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        update_str(&mut h, k);
        // Writing into a Hasher cannot fail.
        let _ = v.write_tagged(&mut h);
    }
    h.update(p.embd.as_bytes());
    match &p.head {
        None => {
            h.update(&[0]);
        }
        Some(head) => {
            h.update(&[1]);
            h.update(head.as_bytes());
        }
    }
    h.update(p.globals.as_bytes());
    h.update(&(p.blocks.len() as u64).to_le_bytes());
    for b in p.blocks {
        h.update(b.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

fn update_str(h: &mut Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// The `embd_hash` of a token-embedding sidecar (or any GGUF holding a
/// `token_embd.weight`), computed exactly as [`crate::inspect`] computes a
/// model's `embd_hash`, so a sidecar can be checked against its source.
pub fn token_embd_hash(g: &Gguf) -> Option<String> {
    let t = g.tensor("token_embd.weight")?;
    Some(
        hash_tensors(g, vec![("token_embd.weight".to_string(), t)])
            .to_hex()
            .to_string(),
    )
}
