//! Writing layer-range slices (see the crate docs for the recipe).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{SliceError, WriteError};
use crate::gguf::read::Gguf;
use crate::gguf::types::GGML_TYPE_F32;
use crate::gguf::value::MetaValue;
use crate::gguf::write::{write_gguf, NewTensor, TensorData};
use crate::info::EMBD;
use crate::info::{arch_of, classify, inspect, model_info, n_layers_of, ModelInfo, TensorKind};
use crate::keys;

/// The version written to `nakshatra.format_version`.
pub const FORMAT_VERSION: u32 = 1;

/// Per-layer-looking arrays (length may equal `block_count` by chance) that
/// must never be cut. Keys are relative to `{arch}.`. (The sliding-window
/// pattern is per layer, but [`crate::arch::rewrite_metadata`] writes it.)
const NOT_PER_LAYER: &[&str] = &[
    "rope.dimension_sections",
    "attention.sliding_window_pattern",
];

/// `Ok` if `arch` can be sliced (it has a row in [`crate::arch::FAMILIES`]),
/// else [`SliceError::UnsupportedArch`] (whose message lists the supported
/// ones).
pub fn supported_arch(arch: &str) -> Result<(), SliceError> {
    crate::arch::family(arch).map(|_| ())
}

/// The path of the embedding sidecar written next to a first (non-last)
/// slice: `<out>.embd.gguf`, i.e. `.embd.gguf` appended to the full file
/// name (`/m/s.gguf` → `/m/s.gguf.embd.gguf`).
pub fn embd_sidecar_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(".embd.gguf");
    PathBuf::from(s)
}

/// What [`write_slice`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceOutput {
    /// The slice file (the `out` argument).
    pub path: PathBuf,
    /// The embedding sidecar ([`embd_sidecar_path`]), written only for a
    /// first slice that is not also the last (`start == 0 && end < n`).
    pub embd_sidecar: Option<PathBuf>,
    /// [`ModelInfo`] of the written slice (its own id; `slice` is set).
    pub info: ModelInfo,
    /// Total bytes written: the slice plus the sidecar, if any.
    pub bytes: u64,
}

/// Writes the layers `start..end` of the model at `src` as a GGUF file at
/// `out` that stock llama.cpp can load, plus an embedding sidecar for a first
/// slice.
///
/// - Metadata: all keys in their original order, except
///   `{arch}.block_count = end - start`; `{arch}.*` arrays with one entry per
///   layer cut to `start..end`; and, unless `end` is the last layer, every
///   `tokenizer.*` key replaced by `tokenizer.ggml.model = "none"` and
///   `{arch}.vocab_size = 1`. Appended: `nakshatra.source_model_id`,
///   `nakshatra.layer_start`, `nakshatra.layer_end`,
///   `nakshatra.n_layers_total`, `nakshatra.format_version`.
/// - Tensors, in original order: `blk.{i}.*` for `i` in range renamed
///   `blk.{i-start}.*`, byte-identical; every other tensor kept, except that
///   a non-last slice gets an all-zero F32 `[n_embd, 1]` `token_embd.weight`
///   and no `output.weight`/`output.bias`.
/// - The last slice keeps `token_embd.weight` even when the model has an
///   untied `output.weight`: llama.cpp's llama/qwen loaders require
///   `token_embd` with shape `[n_embd, n_vocab]`, and `n_vocab` comes from the
///   real tokenizer that the last slice keeps. It costs disk only: fed
///   embeddings, llama.cpp never reads it, so its mapped pages stay cold.
///
/// Same alignment as the source, zero padding, deterministic bytes. Each file
/// is written to `<path>.tmp-<pid>`, synced and renamed into place; on error
/// the temporary files are removed. A stale sidecar from an earlier slice at
/// the same `out` is removed when this slice has none. Refuses files that are
/// already slices ([`SliceError::AlreadySliced`]).
pub fn write_slice(
    src: &Path,
    start: u32,
    end: u32,
    out: &Path,
) -> Result<SliceOutput, SliceError> {
    let t0 = Instant::now();
    let (g, arch, n) = open_source(src, start, end, out)?;

    let info = model_info(&g)?;
    let t_hash = t0.elapsed();
    let source = SliceSource {
        metadata: g.metadata(),
        arch: &arch,
        n_layers: n,
        n_embd: info.n_embd,
        source_id: &info.id,
        block_hashes: &info.block_hashes,
        tensors: src_tensors(&g),
    };
    let written = write_slice_files(&source, start, end, out)?;
    tracing::info!(
        src = %src.display(),
        out = %written.path.display(),
        start,
        end,
        bytes = written.bytes,
        hash_ms = t_hash.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        "wrote slice"
    );
    Ok(written)
}

/// Opens the whole model at `src` to write layers `start..end` of it to
/// `out`: its architecture (one the slicer supports) and layer count,
/// refusing a file that is already a slice, a range outside the model and
/// an `out` that is one of the model's own files.
fn open_source(
    src: &Path,
    start: u32,
    end: u32,
    out: &Path,
) -> Result<(Gguf, String, u32), SliceError> {
    let g = Gguf::open(src)?;
    let arch = arch_of(&g)?;
    if let Some(id) = g.get(keys::SOURCE_MODEL_ID) {
        return Err(SliceError::AlreadySliced {
            path: src.to_path_buf(),
            source_id: id.as_str().unwrap_or("?").to_string(),
        });
    }
    supported_arch(&arch)?;
    let n = n_layers_of(&g, &arch)?;
    check_range(start, end, n)?;
    if g.shard_paths().any(|p| is_same_file(p, out)) {
        return Err(SliceError::OutputIsInput {
            path: out.to_path_buf(),
        });
    }
    Ok((g, arch, n))
}

/// Every tensor of `g`, in file order, with its data.
fn src_tensors(g: &Gguf) -> Vec<SrcTensor<'_>> {
    g.tensors()
        .iter()
        .map(|t| SrcTensor {
            name: t.name.clone(),
            ggml_type: t.ggml_type,
            dims: &t.dims,
            data: Some(g.tensor_data(t)),
        })
        .collect()
}

/// Writes an early-exit draft of the model at `src` to `out`: its first
/// `blocks` blocks, then its own final norm and head, as a standalone
/// model (the whole vocabulary, no `nakshatra.*` keys) that llama.cpp
/// runs like any other. It shares the model's vocabulary by construction,
/// which is what `node ask --draft` needs; how often its guesses are
/// right depends on how much the remaining blocks change the answer
/// (self-speculative decoding: Draft & Verify, LayerSkip). Written
/// atomically (temporary file, then rename).
pub fn write_early_exit(src: &Path, blocks: u32, out: &Path) -> Result<ModelInfo, SliceError> {
    let (g, arch, n) = open_source(src, 0, blocks, out)?;
    let family = crate::arch::family(&arch)?;
    let meta = crate::arch::Meta {
        metadata: g.metadata(),
        arch: &arch,
        n_layers: n,
    };
    crate::arch::check_slice_range(&meta, 0, blocks)?;
    let mut metadata = slice_metadata(g.metadata(), family, n, 0, blocks, None)?;
    crate::arch::rewrite_metadata(&meta, 0, blocks, &mut metadata)?;
    let source = SliceSource {
        metadata: g.metadata(),
        arch: &arch,
        n_layers: n,
        n_embd: 0,
        source_id: "",
        block_hashes: &[],
        tensors: src_tensors(&g),
    };
    // As the last slice keeps them: the embeddings and the head whole.
    let tensors = slice_tensors(&source, 0, blocks, true, family.head_required)?;
    let main = TmpFile::write(out, |w| write_gguf(w, &metadata, &tensors))?;
    let path = main.commit()?;
    let info = inspect(&path)?;
    tracing::info!(src = %src.display(), out = %path.display(), blocks, "wrote early-exit draft");
    Ok(info)
}

/// `Ok` if `start..end` is a non-empty range of an `n`-layer model, else
/// [`SliceError::EmptyRange`] or [`SliceError::RangeOutOfBounds`].
pub(crate) fn check_range(start: u32, end: u32, n: u32) -> Result<(), SliceError> {
    if start >= end {
        return Err(SliceError::EmptyRange { start, end });
    }
    if end > n {
        return Err(SliceError::RangeOutOfBounds {
            start,
            end,
            n_layers: n,
        });
    }
    Ok(())
}

/// One tensor of the model a slice is cut from.
pub(crate) struct SrcTensor<'a> {
    /// Its name in the source model (blocks as `blk.{layer}.*`).
    pub name: String,
    /// ggml type id (`enum ggml_type`).
    pub ggml_type: u32,
    /// Shape in ggml order (innermost dimension first).
    pub dims: &'a [u64],
    /// Its bytes; `None` where the source does not have them (a piece that
    /// was not fetched). Only the tensors a slice copies need them.
    pub data: Option<&'a [u8]>,
}

/// Everything the slice writer needs from the model it cuts: the source of
/// [`write_slice`] (a GGUF file) and of [`crate::write_slice_from_pieces`]
/// (a vocabulary file and piece files) alike.
pub(crate) struct SliceSource<'a> {
    /// The model's metadata in file order (`nakshatra.*` keys are ignored).
    pub metadata: &'a [(String, MetaValue)],
    /// `general.architecture`.
    pub arch: &'a str,
    /// Number of layers (blocks) of the whole model.
    pub n_layers: u32,
    /// Hidden size (width of a hidden state).
    pub n_embd: u32,
    /// The id of the whole model, recorded in the slice's metadata.
    pub source_id: &'a str,
    /// The model's block hashes, by layer (to check the written slice).
    pub block_hashes: &'a [String],
    /// Every tensor of the model, in the model file's order.
    pub tensors: Vec<SrcTensor<'a>>,
}

/// Writes slice `start..end` of `src` to `out` (and its sidecar), the
/// shared body of [`write_slice`] and [`crate::write_slice_from_pieces`].
/// The range must already be checked.
pub(crate) fn write_slice_files(
    src: &SliceSource<'_>,
    start: u32,
    end: u32,
    out: &Path,
) -> Result<SliceOutput, SliceError> {
    let last = end == src.n_layers;
    let family = crate::arch::family(src.arch)?;
    let meta = crate::arch::Meta {
        metadata: src.metadata,
        arch: src.arch,
        n_layers: src.n_layers,
    };
    crate::arch::check_slice_range(&meta, start, end)?;
    let mut metadata = slice_metadata(
        src.metadata,
        family,
        src.n_layers,
        start,
        end,
        Some(src.source_id),
    )?;
    crate::arch::rewrite_metadata(&meta, start, end, &mut metadata)?;
    let tensors = slice_tensors(src, start, end, last, family.head_required)?;

    let sidecar = if start == 0 && !last {
        let embd = src
            .tensors
            .iter()
            .find(|t| t.name == EMBD)
            .ok_or_else(|| SliceError::MissingTensor(EMBD.into()))?;
        let mut meta = vec![(
            keys::ARCH.to_string(),
            MetaValue::String(src.arch.to_string()),
        )];
        if let Some((_, a)) = src.metadata.iter().find(|(k, _)| k == keys::ALIGNMENT) {
            meta.push((keys::ALIGNMENT.to_string(), a.clone()));
        }
        meta.push((
            keys::SOURCE_MODEL_ID.to_string(),
            MetaValue::String(src.source_id.to_string()),
        ));
        meta.push((
            keys::ROLE.to_string(),
            MetaValue::String("token_embd".into()),
        ));
        meta.push((
            keys::FORMAT_VERSION.to_string(),
            MetaValue::U32(FORMAT_VERSION),
        ));
        let tensor = NewTensor {
            name: EMBD.to_string(),
            ggml_type: embd.ggml_type,
            dims: embd.dims.to_vec(),
            data: TensorData::Bytes(data_of(embd)?),
        };
        let path = embd_sidecar_path(out);
        let tmp = TmpFile::write(&path, |w| write_gguf(w, &meta, &[tensor]))?;
        Some(tmp)
    } else {
        None
    };
    let main = TmpFile::write(out, |w| write_gguf(w, &metadata, &tensors))?;

    // Both files are complete and synced: move them into place, sidecar first
    // so that a visible slice always has its sidecar.
    let mut bytes = main.bytes;
    let embd_sidecar = match sidecar {
        Some(s) => {
            bytes += s.bytes;
            Some(s.commit()?)
        }
        None => {
            let stale = embd_sidecar_path(out);
            if stale.exists() {
                tracing::info!(path = %stale.display(), "removing stale embedding sidecar");
                fs::remove_file(&stale).map_err(|source| SliceError::Io {
                    path: stale.clone(),
                    source,
                })?;
            }
            None
        }
    };
    let path = main.commit()?;

    let info = inspect(&path)?;
    if info.block_hashes.as_slice()
        != src
            .block_hashes
            .get(start as usize..end as usize)
            .unwrap_or(&[])
    {
        return Err(SliceError::BadModel(format!(
            "internal error: the block hashes of {} do not match the source layers {start}..{end}",
            path.display()
        )));
    }
    Ok(SliceOutput {
        path,
        embd_sidecar,
        info,
        bytes,
    })
}

/// The bytes of a source tensor that a slice copies.
fn data_of<'a>(t: &SrcTensor<'a>) -> Result<&'a [u8], SliceError> {
    t.data.ok_or_else(|| {
        SliceError::BadModel(format!(
            "internal error: the data of tensor '{}' is not available",
            t.name
        ))
    })
}

/// The slice's metadata (see [`write_slice`]).
fn slice_metadata(
    metadata: &[(String, MetaValue)],
    family: &crate::arch::Family,
    n: u32,
    start: u32,
    end: u32,
    source_id: Option<&str>,
) -> Result<Vec<(String, MetaValue)>, SliceError> {
    // A slice keeps the vocabulary only at the end of the model; an
    // early-exit draft (no source id: a model of its own) always does.
    let last = end == n || source_id.is_none();
    let arch = family.arch;
    let prefix = format!("{arch}.");
    let block_count_key = format!("{arch}.block_count");
    let vocab_key = format!("{arch}.vocab_size");
    let has_vocab_key = metadata.iter().any(|(k, _)| *k == vocab_key);
    let mut out: Vec<(String, MetaValue)> = Vec::with_capacity(metadata.len() + 6);
    let mut put_tokenizer_model = !last;

    for (k, v) in metadata {
        // A slice is one file: no shard keys (llama.cpp would look for
        // the other shards of it).
        if k.starts_with("nakshatra.") || k.starts_with("split.") {
            continue;
        }
        if !last && k.starts_with("tokenizer.") {
            if put_tokenizer_model {
                out.push((
                    "tokenizer.ggml.model".into(),
                    MetaValue::String("none".into()),
                ));
                put_tokenizer_model = false;
            }
            continue;
        }
        if *k == block_count_key {
            out.push((k.clone(), same_int_type(v, end - start)));
            if !last && !has_vocab_key {
                out.push((vocab_key.clone(), MetaValue::U32(1)));
            }
            continue;
        }
        if !last && *k == vocab_key {
            out.push((k.clone(), MetaValue::U32(1)));
            continue;
        }
        let rel = k.strip_prefix(&prefix);
        let listed = rel.is_some_and(|r| crate::arch::is_per_layer_key(family, r));
        let per_layer = rel
            .filter(|rest| !NOT_PER_LAYER.contains(rest))
            .and_then(|_| v.as_array())
            .filter(|a| a.len() == n as usize);
        if listed && per_layer.is_none() && v.as_array().is_some() {
            return Err(SliceError::BadKey {
                key: k.clone(),
                reason: format!("a per-layer array must have {n} entries"),
            });
        }
        match per_layer {
            Some(a) => {
                let cut = a
                    .sub_array(start as usize..end as usize)
                    .map(MetaValue::Array)
                    .ok_or_else(|| SliceError::BadKey {
                        key: k.clone(),
                        reason: "cannot cut the per-layer array".into(),
                    })?;
                out.push((k.clone(), cut));
            }
            None => out.push((k.clone(), v.clone())),
        }
    }
    if put_tokenizer_model {
        out.push((
            "tokenizer.ggml.model".into(),
            MetaValue::String("none".into()),
        ));
    }
    let Some(source_id) = source_id else {
        return Ok(out);
    };
    out.push((
        keys::SOURCE_MODEL_ID.into(),
        MetaValue::String(source_id.into()),
    ));
    out.push((keys::LAYER_START.into(), MetaValue::U32(start)));
    out.push((keys::LAYER_END.into(), MetaValue::U32(end)));
    out.push((keys::N_LAYERS_TOTAL.into(), MetaValue::U32(n)));
    out.push((keys::FORMAT_VERSION.into(), MetaValue::U32(FORMAT_VERSION)));
    Ok(out)
}

/// `n` as an integer value of the same GGUF type as `like` (falls back to
/// `u32` if it does not fit or `like` is not an integer).
fn same_int_type(like: &MetaValue, n: u32) -> MetaValue {
    let fallback = MetaValue::U32(n);
    match like {
        MetaValue::U8(_) => u8::try_from(n).map(MetaValue::U8).unwrap_or(fallback),
        MetaValue::I8(_) => i8::try_from(n).map(MetaValue::I8).unwrap_or(fallback),
        MetaValue::U16(_) => u16::try_from(n).map(MetaValue::U16).unwrap_or(fallback),
        MetaValue::I16(_) => i16::try_from(n).map(MetaValue::I16).unwrap_or(fallback),
        MetaValue::I32(_) => i32::try_from(n).map(MetaValue::I32).unwrap_or(fallback),
        MetaValue::U64(_) => MetaValue::U64(n.into()),
        MetaValue::I64(_) => MetaValue::I64(n.into()),
        _ => fallback,
    }
}

/// The slice's tensors (see [`write_slice`]).
fn slice_tensors<'a>(
    src: &SliceSource<'a>,
    start: u32,
    end: u32,
    last: bool,
    head_required: bool,
) -> Result<Vec<NewTensor<'a>>, SliceError> {
    let mut out = Vec::new();
    for t in &src.tensors {
        let copy = |name: String| -> Result<NewTensor<'a>, SliceError> {
            Ok(NewTensor {
                name,
                ggml_type: t.ggml_type,
                dims: t.dims.to_vec(),
                data: TensorData::Bytes(data_of(t)?),
            })
        };
        match classify(&t.name)? {
            TensorKind::Block { layer, suffix } => {
                if (start..end).contains(&layer) {
                    out.push(copy(format!("blk.{}.{suffix}", layer - start))?);
                }
            }
            TensorKind::Embd if !last => out.push(NewTensor {
                name: EMBD.into(),
                ggml_type: GGML_TYPE_F32,
                dims: vec![src.n_embd.into(), 1],
                data: TensorData::Zeros,
            }),
            // A non-last slice computes no logits; families that refuse to
            // load without a head get a placeholder for its 1-token vocab.
            TensorKind::Head if !last && head_required => out.push(NewTensor {
                name: t.name.clone(),
                ggml_type: GGML_TYPE_F32,
                dims: vec![src.n_embd.into(), 1],
                data: TensorData::Zeros,
            }),
            TensorKind::Head if !last => {}
            TensorKind::Global if !last && t.name == "output.bias" => {}
            _ => out.push(copy(t.name.clone())?),
        }
    }
    Ok(out)
}

/// Whether `a` and `b` name the same existing file.
pub(crate) fn is_same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A fully written and synced temporary file, renamed into place by
/// [`TmpFile::commit`] and removed if dropped uncommitted.
struct TmpFile {
    tmp: PathBuf,
    dest: PathBuf,
    bytes: u64,
    committed: bool,
}

impl TmpFile {
    /// Writes `dest`'s content to `<dest>.tmp-<pid>` with `f`, flushes and
    /// fsyncs it.
    fn write(
        dest: &Path,
        f: impl FnOnce(&mut dyn Write) -> Result<u64, WriteError>,
    ) -> Result<TmpFile, SliceError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SliceError::Io { path, source }
        };
        let name = dest.file_name().ok_or_else(|| SliceError::Io {
            path: dest.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the output path has no file name",
            ),
        })?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let mut tmp = TmpFile {
            tmp: dest.with_file_name(tmp_name),
            dest: dest.to_path_buf(),
            bytes: 0,
            committed: false,
        };
        let file = File::create(&tmp.tmp).map_err(io_err(&tmp.tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        tmp.bytes = f(&mut w).map_err(|source| match source {
            WriteError::Io(source) => SliceError::Io {
                path: tmp.tmp.clone(),
                source,
            },
            source => SliceError::Write {
                path: tmp.tmp.clone(),
                source,
            },
        })?;
        let file = w.into_inner().map_err(|e| SliceError::Io {
            path: tmp.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&tmp.tmp))?;
        Ok(tmp)
    }

    /// Renames the temporary file to its destination and syncs the directory
    /// (best effort).
    fn commit(mut self) -> Result<PathBuf, SliceError> {
        fs::rename(&self.tmp, &self.dest).map_err(|source| SliceError::Io {
            path: self.dest.clone(),
            source,
        })?;
        self.committed = true;
        if let Some(dir) = self.dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                tracing::debug!(dir = %dir.display(), error = %e, "could not fsync directory");
            }
        }
        Ok(self.dest.clone())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_path_appends() {
        assert_eq!(
            embd_sidecar_path(Path::new("/m/s.gguf")),
            PathBuf::from("/m/s.gguf.embd.gguf")
        );
    }

    #[test]
    fn block_count_keeps_type() {
        assert_eq!(same_int_type(&MetaValue::U64(30), 10), MetaValue::U64(10));
        assert_eq!(same_int_type(&MetaValue::U32(30), 10), MetaValue::U32(10));
        assert_eq!(same_int_type(&MetaValue::U8(30), 300), MetaValue::U32(300));
    }

    #[test]
    fn unsupported_arch_lists_supported() {
        let e = supported_arch("gpt2").unwrap_err().to_string();
        assert!(
            e.contains("'gpt2'")
                && e.contains("llama, mistral3, qwen2, qwen3")
                && e.contains("olmo2"),
            "{e}"
        );
        assert!(supported_arch("llama").is_ok());
    }
}
