//! The local slice cache: `<data dir>/slices/<model id>/<a>-<b>.gguf`.
//!
//! A cached slice is reused only after its content is checked against the
//! source model (same source id, same range, block hashes equal to the
//! source's), never trusted by its name. Slices are written atomically by
//! the slicer, so a crash never leaves a half-written file under the final
//! name.

use std::ops::Range;
use std::path::{Path, PathBuf};

use nakshatra_slicer::{inspect, write_slice, ModelHashes, SliceError};

use crate::engine::sidecar_path;

/// Errors of the slice cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Slicing or inspecting failed.
    #[error(transparent)]
    Slice(#[from] SliceError),
    /// The cache directory could not be made.
    #[error("cannot create cache directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The platform's data directory for nakshatra (`~/.local/share/nakshatra`
/// on Linux), unless overridden.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "nakshatra")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".nakshatra"))
}

/// Path of the cached slice `range` of the model `model_id`.
pub fn slice_path(data_dir: &Path, model_id: &str, range: &Range<u32>) -> PathBuf {
    data_dir
        .join("slices")
        .join(model_id)
        .join(format!("{}-{}.gguf", range.start, range.end))
}

/// Checks that `path` is the slice `range` of the model `source_id`
/// (whose group hashes are `hashes`), by content: block hashes and, for a
/// first slice, the embedding sidecar.
pub fn verify_cached(
    path: &Path,
    source_id: &str,
    hashes: &ModelHashes,
    range: &Range<u32>,
) -> Result<(), String> {
    let info = inspect(path).map_err(|e| e.to_string())?;
    let meta = info.slice.as_ref().ok_or("not a slice")?;
    if meta.source_id != source_id
        || meta.start != range.start
        || meta.end != range.end
        || meta.n_layers_total != hashes.n_layers
    {
        return Err("slice of another model or range".into());
    }
    let want = hashes
        .block_hashes
        .get(range.start as usize..range.end as usize)
        .ok_or("range outside the source")?;
    if info.block_hashes != want {
        return Err("block hashes differ from the source".into());
    }
    if range.start == 0 && range.end < hashes.n_layers {
        let side = inspect_sidecar_hash(&sidecar_path(path))?;
        if side != hashes.embd_hash {
            return Err("embedding sidecar differs from the source".into());
        }
    }
    Ok(())
}

fn inspect_sidecar_hash(path: &Path) -> Result<String, String> {
    let g = nakshatra_slicer::Gguf::open(path).map_err(|e| e.to_string())?;
    nakshatra_slicer::hash::token_embd_hash(&g)
        .ok_or_else(|| "sidecar has no token_embd.weight".into())
}

/// Returns the cached slice `range` of the model at `source_path` (model
/// `source_id`, whose group hashes are `hashes`), writing it first when
/// missing or not verified.
pub fn ensure_slice(
    data_dir: &Path,
    source_path: &Path,
    source_id: &str,
    hashes: &ModelHashes,
    range: &Range<u32>,
) -> Result<PathBuf, CacheError> {
    if range.start == 0 && range.end == hashes.n_layers {
        // The whole model needs no slicing.
        return Ok(source_path.to_path_buf());
    }
    let path = slice_path(data_dir, source_id, range);
    if path.exists() {
        match verify_cached(&path, source_id, hashes, range) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "reusing verified cached slice");
                return Ok(path);
            }
            Err(why) => {
                tracing::warn!(path = %path.display(), %why, "cached slice rejected; rewriting it");
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let out = write_slice(source_path, range.start, range.end, &path)?;
    tracing::info!(path = %out.path.display(), bytes = out.bytes, "wrote slice {}..{}", range.start, range.end);
    Ok(out.path)
}
