//! GGUF v2/v3 reader over a memory map (or an in-memory buffer).
//!
//! Every length, count and offset read from the file is checked against the
//! bytes that are really there before anything is allocated or sliced, so a
//! hostile or damaged file yields a [`GgufError`], never a panic or a huge
//! allocation.
//!
//! ## Split models
//!
//! A model split by llama.cpp's `gguf-split` is a set of files
//! `NAME-00001-of-0000N.gguf` .. `NAME-0000N-of-0000N.gguf`. Each carries
//! `split.no` (u16, from 0), `split.count` (u16) and, in the first,
//! `split.tensors.count` (i32, the tensors of all shards). The first shard
//! holds all model metadata; every tensor is in exactly one shard.
//! [`Gguf::open`] given the first shard opens them all, as llama.cpp's
//! loader does, and checks that they fit together: each shard's `split.no`
//! is its place in the set and its `split.count` the first's, no tensor is
//! in two shards, and the tensors add up to `split.tensors.count`. The
//! result is one model: the first shard's metadata, every shard's tensors
//! (in shard order, which is the order `gguf-split --merge` writes them in),
//! each read from its own shard. The `split.*` keys describe the files, not
//! the model, so no [`Gguf`] shows them (a merged file, which keeps
//! `split.count = 0`, reads as the original unsplit file): a sharded model
//! and the merged file hash, slice and serve identically.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::{ggml_type_info, tensor_n_bytes, GgmlTypeInfo, SizeError};
use super::value::{MetaArray, MetaValue, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_DIMS};
use crate::error::GgufError;

/// How deeply arrays of arrays may nest (ggml itself allows none).
const MAX_ARRAY_DEPTH: u32 = 8;

/// Most shards a split model may have. Each shard is opened, mapped and
/// parsed when the model is opened, so `split.count` (up to 65535 in the
/// file) is bounded here; real models have a handful (a shard is usually
/// several GB).
pub const MAX_SHARDS: u16 = 1024;

/// Prefix of the metadata keys that describe how a model is split into
/// files (`split.no`, `split.count`, `split.tensors.count`); a [`Gguf`]
/// never shows them.
pub const SPLIT_PREFIX: &str = "split.";

/// `split.no`: the shard's number, from 0 (u16).
const SPLIT_NO: &str = "split.no";
/// `split.count`: how many shards the model has (u16; 0 or 1: not split).
const SPLIT_COUNT: &str = "split.count";
/// `split.tensors.count`: the tensors of all shards together (i32).
const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// Description of one tensor in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// ggml type id (see [`crate::ggml_type_info`]).
    pub ggml_type: u32,
    /// Shape in ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    /// Absolute offset of the tensor's first data byte in the file that
    /// holds it (see `shard`).
    pub offset: u64,
    /// Size of the tensor data in bytes.
    pub n_bytes: u64,
    /// The file holding the tensor's data: its index in
    /// [`Gguf::shard_paths`], 0 (the file opened) unless the model is split.
    pub shard: u16,
}

impl TensorInfo {
    /// Size information of the tensor's ggml type (always `Some` for a tensor
    /// read by [`Gguf::open`]).
    pub fn type_info(&self) -> Option<&'static GgmlTypeInfo> {
        ggml_type_info(self.ggml_type)
    }

    /// Number of elements (product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }
}

/// A parsed GGUF file, backed by a read-only memory map of the file
/// ([`Gguf::open`]) or by an owned buffer ([`Gguf::from_bytes`]); for a
/// split model, by the maps of all its shards (see [`Gguf::open`]).
///
/// The map is shared with the OS page cache: tensor data is only read from
/// disk when touched. As with any memory map, the file must not be truncated
/// or rewritten in place while a `Gguf` is open (replacing it by rename, as
/// this crate does, is safe).
pub struct Gguf {
    path: PathBuf,
    /// The file opened, then the other shards of a split model in order.
    shards: Vec<Shard>,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("n_shards", &self.shards.len())
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.file_len())
            .finish()
    }
}

/// One file of a [`Gguf`]: the only one, or a shard of a split model.
struct Shard {
    path: PathBuf,
    map: Backing,
}

/// The bytes a [`Gguf`] was parsed from.
enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

impl Gguf {
    /// Opens, maps and validates a GGUF file: magic, version (2 or 3), every
    /// metadata entry, every tensor info (known type, at most 4 dims, size
    /// without overflow, aligned offset) and that all tensor data lies
    /// within the file.
    ///
    /// A model split by llama.cpp's `gguf-split` (`NAME-00001-of-0000N.gguf`
    /// .. `NAME-0000N-of-0000N.gguf`, `split.count` over 1) is opened from
    /// its first shard, as llama.cpp's loader does: the other shards' names
    /// come from the first's, each is validated as above, and the set must
    /// fit together: each shard's `split.no` is its place in the set and its
    /// `split.count` the first's, no tensor is in two shards
    /// ([`GgufError::BadTensor`]), the tensors add up to the first's
    /// `split.tensors.count`, and there are at most `MAX_SHARDS` (1024)
    /// shards ([`GgufError::BadSplit`]). A shard that is not there is
    /// [`GgufError::MissingShard`]; any shard but the first is
    /// [`GgufError::NotFirstShard`]. The result is one model: the first
    /// shard's metadata, all tensors (in shard order), each read from its
    /// shard. The `split.*` keys are not shown (see the module docs of
    /// `gguf::read`).
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let map = map_file(path)?;
        let mut parsed = parse(&map, path)?;
        let split = split_keys(&parsed.metadata, path)?;
        parsed
            .metadata
            .retain(|(k, _)| !k.starts_with(SPLIT_PREFIX));
        let mut shards = vec![Shard {
            path: path.to_path_buf(),
            map,
        }];
        if let Some(split) = split {
            open_other_shards(path, &split, &mut shards, &mut parsed.tensors)?;
        }
        Ok(Self::from_parts(path.to_path_buf(), shards, parsed))
    }

    /// Parses and validates a GGUF file held in memory, with exactly the
    /// checks of [`Gguf::open`] (an empty buffer is [`GgufError::NotGguf`]).
    /// Damaged or hostile bytes give an error, never a panic, and nothing
    /// is allocated beyond what the buffer's own size bounds. A shard of a
    /// split model (`split.count` over 1) is [`GgufError::BadSplit`]: its
    /// other shards cannot be found from memory.
    ///
    /// `name` stands in for the path in error messages and is what
    /// [`Gguf::path`] returns, e.g. `"vocabulary from peer X"`.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Gguf, GgufError> {
        let path = PathBuf::from(name);
        let mut parsed = parse(&bytes, &path)?;
        if let Some(split) = split_keys(&parsed.metadata, &path)? {
            return Err(GgufError::BadSplit {
                path,
                reason: format!(
                    "it is shard {} of {} of a split model, which cannot be read from memory",
                    u32::from(split.no) + 1,
                    split.count
                ),
            });
        }
        parsed
            .metadata
            .retain(|(k, _)| !k.starts_with(SPLIT_PREFIX));
        let shards = vec![Shard {
            path: path.clone(),
            map: Backing::Owned(bytes),
        }];
        Ok(Self::from_parts(path, shards, parsed))
    }

    fn from_parts(path: PathBuf, shards: Vec<Shard>, parsed: Parsed) -> Gguf {
        Gguf {
            path,
            shards,
            version: parsed.version,
            meta_index: index(parsed.metadata.iter().map(|(k, _)| k.as_str())),
            metadata: parsed.metadata,
            tensor_index: index(parsed.tensors.iter().map(|t| t.name.as_str())),
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        }
    }

    /// All metadata entries, in file order (of the first shard, for a split
    /// model), without the `split.*` keys.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        let i = *self.meta_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    /// All tensor infos, in file order (for a split model: the first
    /// shard's, then the second's, ...).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let i = *self.tensor_index.get(name)?;
        self.tensors.get(i)
    }

    /// The data bytes of a tensor of this file (straight from the map or
    /// buffer of the shard holding it).
    ///
    /// Returns an empty slice if `t` does not describe bytes inside this file
    /// (e.g. a `TensorInfo` taken from another `Gguf`); it never panics.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let map = match self.shards.get(usize::from(t.shard)) {
            Some(s) => &s.map,
            None => return &[],
        };
        let range = usize::try_from(t.offset).ok().and_then(|start| {
            let end = start.checked_add(usize::try_from(t.n_bytes).ok()?)?;
            map.get(start..end)
        });
        range.unwrap_or(&[])
    }

    /// Data alignment in bytes (`general.alignment`, or 32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The path the file was opened from (for [`Gguf::from_bytes`], the name
    /// given there; for a split model, its first shard).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The paths of the files the model was read from: [`Gguf::path`] alone,
    /// or every shard of a split model in order (index = [`TensorInfo::shard`]).
    pub fn shard_paths(&self) -> impl ExactSizeIterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// GGUF format version (2 or 3; of the first shard, for a split model).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Absolute file offset where the tensor data section starts (in the
    /// first shard, for a split model).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the file in bytes; for a split model, of all its shards
    /// together.
    pub fn file_len(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.map.len() as u64))
    }
}

/// Opens and maps a GGUF file (read-only).
fn map_file(path: &Path) -> Result<Backing, GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: memmap2's contract is that the file is not modified or
    // truncated (in or out of process) while the map is in use, since the
    // `&[u8]` it hands out would then change or fault under us. We map
    // read-only and never write the file; that no one else does is the
    // documented condition of `Gguf` (see its docs), which is why this crate
    // itself only ever replaces GGUFs by rename, leaving the mapped inode
    // intact. The map is owned by the returned `Backing`, which only a
    // `Gguf` keeps, so it is not used after unmapping.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    Ok(Backing::Map(map))
}

/// What the `split.*` keys of a shard of a split model say.
#[derive(Debug, Clone, Copy)]
struct SplitKeys {
    /// `split.no`: the shard's number, from 0.
    no: u16,
    /// `split.count`: more than 1.
    count: u16,
    /// `split.tensors.count`, if present.
    n_tensors: Option<i32>,
}

/// The `split.*` keys of a file, with the types llama.cpp requires; `None`
/// when the file is not a shard of a split model (`split.count` absent, 0
/// or 1, as llama.cpp reads it; the other keys are then ignored, as there).
fn split_keys(
    metadata: &[(String, MetaValue)],
    path: &Path,
) -> Result<Option<SplitKeys>, GgufError> {
    let get = |key: &str| metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let bad = |reason: String| GgufError::BadSplit {
        path: path.to_path_buf(),
        reason,
    };
    let count = match get(SPLIT_COUNT) {
        None => return Ok(None),
        Some(MetaValue::U16(n)) => *n,
        Some(v) => {
            return Err(bad(format!(
                "{SPLIT_COUNT} must be a u16, found {}",
                v.brief()
            )))
        }
    };
    if count <= 1 {
        return Ok(None);
    }
    let no = match get(SPLIT_NO) {
        Some(MetaValue::U16(n)) => *n,
        None => {
            return Err(bad(format!(
                "{SPLIT_COUNT} is {count} but {SPLIT_NO} is missing"
            )))
        }
        Some(v) => {
            return Err(bad(format!(
                "{SPLIT_NO} must be a u16, found {}",
                v.brief()
            )))
        }
    };
    if no >= count {
        return Err(bad(format!(
            "{SPLIT_NO} is {no}, but the model has only {count} shards (numbered from 0)"
        )));
    }
    let n_tensors = match get(SPLIT_TENSORS_COUNT) {
        None => None,
        Some(MetaValue::I32(n)) => Some(*n),
        Some(v) => {
            return Err(bad(format!(
                "{SPLIT_TENSORS_COUNT} must be an i32, found {}",
                v.brief()
            )))
        }
    };
    Ok(Some(SplitKeys {
        no,
        count,
        n_tensors,
    }))
}

/// The name ending of shard `no` (from 0) of `count`, as llama.cpp's
/// `llama_split_path` writes it: `-00001-of-00003.gguf`.
fn shard_suffix(no: u16, count: u16) -> String {
    format!("-{:05}-of-{count:05}.gguf", u32::from(no) + 1)
}

/// The path of shard `no` of `count` of the split model that `path`, shard
/// `at`, belongs to; `None` when `path`'s file name does not end in
/// [`shard_suffix`]`(at, count)` (llama.cpp then refuses it too).
fn sibling_shard(path: &Path, at: u16, no: u16, count: u16) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let prefix = name.strip_suffix(&shard_suffix(at, count))?;
    if prefix.is_empty() {
        return None;
    }
    Some(path.with_file_name(format!("{prefix}{}", shard_suffix(no, count))))
}

/// Opens shards `2..=count` of the split model whose first shard (already
/// parsed: its tensors are `tensors`) is `first`, appends them to `shards`
/// and their tensors to `tensors`, and checks that the set fits together.
fn open_other_shards(
    first: &Path,
    split: &SplitKeys,
    shards: &mut Vec<Shard>,
    tensors: &mut Vec<TensorInfo>,
) -> Result<(), GgufError> {
    let bad = |path: &Path, reason: String| GgufError::BadSplit {
        path: path.to_path_buf(),
        reason,
    };
    let count = split.count;
    if split.no != 0 {
        return Err(GgufError::NotFirstShard {
            path: first.to_path_buf(),
            shard: u32::from(split.no) + 1,
            count: u32::from(count),
            first: sibling_shard(first, split.no, 0, count).map_or_else(
                || format!("the file whose name ends in {}", shard_suffix(0, count)),
                |p| p.display().to_string(),
            ),
        });
    }
    if count > MAX_SHARDS {
        return Err(bad(
            first,
            format!(
                "{SPLIT_COUNT} is {count}, more than the {MAX_SHARDS} shards this reader opens"
            ),
        ));
    }
    let Some(expected) = split.n_tensors else {
        return Err(bad(
            first,
            format!("the first shard has no {SPLIT_TENSORS_COUNT}"),
        ));
    };
    // The other shards' names come from the first's, as in llama.cpp.
    let Some(paths) = (1..count)
        .map(|no| sibling_shard(first, 0, no, count))
        .collect::<Option<Vec<_>>>()
    else {
        return Err(bad(
            first,
            format!(
                "it says it is the first of {count} shards, but its name does not end in {} as \
                 llama.cpp needs to find the other shards (rename it as gguf-split named it)",
                shard_suffix(0, count)
            ),
        ));
    };
    let mut owner: HashMap<String, u16> = tensors.iter().map(|t| (t.name.clone(), 0)).collect();
    for (no, path) in (1..count).zip(paths) {
        let map = map_file(&path).map_err(|e| match e {
            GgufError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                GgufError::MissingShard {
                    path,
                    first: first.to_path_buf(),
                    count: u32::from(count),
                    source,
                }
            }
            e => e,
        })?;
        let parsed = parse(&map, &path)?;
        match split_keys(&parsed.metadata, &path)? {
            Some(s) if s.no == no && s.count == count => {}
            Some(s) => {
                return Err(bad(
                    &path,
                    format!(
                        "it says it is shard {} of {}, but as named next to {} it must be shard \
                         {} of {count}",
                        u32::from(s.no) + 1,
                        s.count,
                        first.display(),
                        u32::from(no) + 1
                    ),
                ))
            }
            None => {
                return Err(bad(
                    &path,
                    format!(
                        "it has no {SPLIT_COUNT} over 1, so it is not shard {} of {count} of {}",
                        u32::from(no) + 1,
                        first.display()
                    ),
                ))
            }
        }
        for mut t in parsed.tensors {
            if let Some(&other) = owner.get(&t.name) {
                let other = shards.get(usize::from(other)).map_or_else(
                    || first.display().to_string(),
                    |s| s.path.display().to_string(),
                );
                return Err(GgufError::BadTensor {
                    path,
                    name: t.name,
                    reason: format!("it is also in the shard {other}"),
                });
            }
            owner.insert(t.name.clone(), no);
            t.shard = no;
            tensors.push(t);
        }
        shards.push(Shard { path, map });
    }
    if usize::try_from(expected).ok() != Some(tensors.len()) {
        return Err(bad(
            first,
            format!(
                "{SPLIT_TENSORS_COUNT} is {expected}, but its {count} shards hold {} tensors",
                tensors.len()
            ),
        ));
    }
    Ok(())
}

fn index<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    names.enumerate().map(|(i, n)| (n.to_string(), i)).collect()
}

/// The result of parsing GGUF bytes.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Parses and validates a whole GGUF file held in `buf`; `path` is only used
/// in error messages.
pub(crate) fn parse(buf: &[u8], path: &Path) -> Result<Parsed, GgufError> {
    if buf.get(..4) != Some(b"GGUF".as_slice()) {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
        });
    }
    let mut r = Reader { buf, pos: 4, path };
    let version = r.u32("the GGUF version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata entry count")?;

    // Minimal encoded sizes: key (8) + tag (4) + 1-byte value; name (8) +
    // n_dims (4) + type (4) + offset (8). Checked up front so the capacity
    // reserved below is bounded by the file size.
    r.check_room(n_kv, 13, "the metadata entries")?;
    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(r.bounded(n_kv, 13));
    let mut seen: HashMap<String, ()> = HashMap::with_capacity(metadata.capacity());
    for i in 0..n_kv {
        let key = r.string(&format!("the key of metadata entry #{i}"))?;
        if key.is_empty() {
            return Err(r.bad_key(key, "keys must not be empty"));
        }
        if seen.insert(key.clone(), ()).is_some() {
            return Err(r.bad_key(key, "the key appears more than once"));
        }
        let tag = r.u32(&format!("the type of metadata key '{key}'"))?;
        let value = r.value(&key, tag, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(GgufError::BadAlignment {
                path: path.to_path_buf(),
                found: v.brief(),
            })
        }
    };

    r.check_room(n_tensors, 24, "the tensor infos")?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(r.bounded(n_tensors, 24));
    let mut names: HashMap<String, ()> = HashMap::with_capacity(tensors.capacity());
    let mut rel_offsets: Vec<u64> = Vec::with_capacity(tensors.capacity());
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor #{i}"))?;
        let what = format!("the info of tensor '{name}'");
        let n_dims = r.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(r.bad_tensor(
                name,
                format!("it has {n_dims} dimensions, at most {MAX_DIMS} are allowed"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&what)?);
        }
        let ggml_type = r.u32(&what)?;
        let rel_offset = r.u64(&what)?;
        let n_bytes = match tensor_n_bytes(ggml_type, &dims) {
            Ok(n) => n,
            Err(SizeError::UnknownType(t)) => return Err(GgufError::UnknownType(t)),
            Err(SizeError::NotBlockAligned { ne0, block_size }) => {
                return Err(r.bad_tensor(
                    name,
                    format!(
                        "row length {ne0} is not a multiple of its type's block size {block_size}"
                    ),
                ))
            }
            Err(SizeError::Overflow) => {
                return Err(r.bad_tensor(name, format!("shape {dims:?} is too large")))
            }
        };
        if rel_offset % alignment != 0 {
            return Err(r.bad_tensor(
                name,
                format!("data offset {rel_offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        if names.insert(name.clone(), ()).is_some() {
            return Err(r.bad_tensor(name, "the name appears more than once".into()));
        }
        rel_offsets.push(rel_offset);
        tensors.push(TensorInfo {
            name,
            ggml_type,
            dims,
            offset: 0,
            n_bytes,
            shard: 0,
        });
    }

    // The data section starts at the next multiple of the alignment (ggml
    // only pads when there are tensors).
    let end_of_infos = r.pos as u64;
    let data_offset = if tensors.is_empty() {
        end_of_infos
    } else {
        let padded = align_up(end_of_infos, alignment).ok_or_else(|| {
            r.truncated_at("the padding before the tensor data", end_of_infos, u64::MAX)
        })?;
        if padded > r.file_len() {
            return Err(r.truncated_at(
                "the padding before the tensor data",
                end_of_infos,
                padded - end_of_infos,
            ));
        }
        padded
    };
    for (t, rel) in tensors.iter_mut().zip(rel_offsets) {
        let what = || format!("the data of tensor '{}'", t.name);
        let start = data_offset
            .checked_add(rel)
            .ok_or_else(|| r.truncated_at(&what(), u64::MAX, t.n_bytes))?;
        match start.checked_add(t.n_bytes) {
            Some(end) if end <= r.file_len() => t.offset = start,
            _ => return Err(r.truncated_at(&what(), start, t.n_bytes)),
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Rounds `n` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(n: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(n.checked_add(mask)? & !mask)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn file_len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn truncated_at(&self, what: &str, offset: u64, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset,
            needed,
            file_len: self.file_len(),
        }
    }

    fn bad_key(&self, key: String, reason: &'static str) -> GgufError {
        GgufError::BadKey {
            path: self.path.to_path_buf(),
            key,
            reason,
        }
    }

    fn bad_tensor(&self, name: String, reason: String) -> GgufError {
        GgufError::BadTensor {
            path: self.path.to_path_buf(),
            name,
            reason,
        }
    }

    /// Errors unless `count` items of at least `min_size` bytes each could
    /// still fit in the rest of the file.
    fn check_room(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => Ok(()),
            n => Err(self.truncated_at(what, self.pos as u64, n.unwrap_or(u64::MAX))),
        }
    }

    /// `count` clamped to what can fit in the rest of the file, for
    /// `Vec::with_capacity`.
    fn bounded(&self, count: u64, min_size: u64) -> usize {
        let fit = self.remaining() / min_size.max(1);
        usize::try_from(count.min(fit)).unwrap_or(0)
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let bytes = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.buf.get(self.pos..end));
        match bytes {
            Some(b) => {
                self.pos += b.len();
                Ok(b)
            }
            None => Err(self.truncated_at(what, self.pos as u64, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                path: self.path.to_path_buf(),
                what: what.to_string(),
            }),
        }
    }

    fn value(&mut self, key: &str, tag: u32, depth: u32) -> Result<MetaValue, GgufError> {
        let ty = ValueType::from_tag(tag).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            tag,
        })?;
        let what = format!("the value of metadata key '{key}'");
        let w = what.as_str();
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(w)?)),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(w)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(w)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(w)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(w)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(w)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(w)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(w)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(w)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(w)?)),
            ValueType::Bool => MetaValue::Bool(self.bool(key, w)?),
            ValueType::String => MetaValue::String(self.string(w)?),
            ValueType::Array => MetaValue::Array(self.meta_array(key, w, depth)?),
        })
    }

    fn bool(&mut self, key: &str, what: &str) -> Result<bool, GgufError> {
        match self.array::<1>(what)? {
            [0] => Ok(false),
            [1] => Ok(true),
            [value] => Err(GgufError::InvalidBool {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                value,
            }),
        }
    }

    fn meta_array(&mut self, key: &str, what: &str, depth: u32) -> Result<MetaArray, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::TooDeep {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let tag = self.u32(what)?;
        let elem = ValueType::from_tag(tag).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            tag,
        })?;
        let n = self.u64(what)?;
        self.check_room(n, elem.min_encoded_len(), what)?;
        // `n` elements fit in the file, so `n` fits in memory as well.
        let n = usize::try_from(n).unwrap_or(0);

        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let bytes = self.take((n as u64).saturating_mul(SIZE as u64), what)?;
                MetaArray::$variant(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| {
                            let mut a = [0u8; SIZE];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            ValueType::U8 => MetaArray::U8(self.take(n as u64, what)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key, what)?);
                }
                MetaArray::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                MetaArray::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.meta_array(key, what, depth + 1)?);
                }
                MetaArray::Array(v)
            }
        })
    }
}
