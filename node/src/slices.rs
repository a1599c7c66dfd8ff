//! The local slice cache (`slices/` in the [`DataDir`]).
//!
//! A cached slice is reused only after its content is checked against the
//! source model (same source id, same range, block hashes equal to the
//! source's), never trusted by its name. Slices are written atomically by
//! the slicer, so a crash never leaves a half-written file under the final
//! name.

use std::ops::Range;
use std::path::{Path, PathBuf};

use nakshatra_slicer::{embd_sidecar_path, inspect, write_slice, ModelHashes, SliceError};

use crate::datadir::DataDir;

/// Errors of the slice cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Slicing or inspecting failed.
    #[error(transparent)]
    Slice(#[from] SliceError),
    /// The cache directory could not be made.
    #[error("cannot create cache directory {path}: {source}")]
    Dir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a cached slice was not reused (it is then written or fetched again).
#[derive(Debug, thiserror::Error)]
pub enum StaleSlice {
    /// It does not parse.
    #[error(transparent)]
    Unreadable(#[from] SliceError),
    /// It carries no slice metadata.
    #[error("not a slice")]
    NotASlice,
    /// It was cut from another model or is another range.
    #[error("slice of another model or range")]
    Other,
    /// Its blocks differ from the source's.
    #[error("block hashes differ from the source")]
    Blocks,
    /// A first slice's embedding sidecar is missing or differs.
    #[error("embedding sidecar differs from the source")]
    Sidecar,
}

/// Checks that `path` is the slice `range` of the model `source_id`
/// (whose group hashes are `hashes`), by content: block hashes and, for a
/// first slice, the embedding sidecar.
pub fn verify_cached(
    path: &Path,
    source_id: &str,
    hashes: &ModelHashes,
    range: &Range<u32>,
) -> Result<(), StaleSlice> {
    let info = inspect(path)?;
    let meta = info.slice.as_ref().ok_or(StaleSlice::NotASlice)?;
    if meta.source_id != source_id
        || meta.start != range.start
        || meta.end != range.end
        || meta.n_layers_total != hashes.n_layers
    {
        return Err(StaleSlice::Other);
    }
    let want = hashes
        .block_hashes
        .get(range.start as usize..range.end as usize)
        .ok_or(StaleSlice::Other)?;
    if info.block_hashes != want {
        return Err(StaleSlice::Blocks);
    }
    if range.start == 0 && range.end < hashes.n_layers {
        let side = nakshatra_slicer::Gguf::open(&embd_sidecar_path(path))
            .ok()
            .and_then(|g| nakshatra_slicer::hash::token_embd_hash(&g));
        if side.as_ref() != Some(&hashes.embd_hash) {
            return Err(StaleSlice::Sidecar);
        }
    }
    Ok(())
}

/// Returns the cached slice `range` of the model at `source_path` (model
/// `source_id`, whose group hashes are `hashes`), writing it first when
/// missing or not verified.
pub fn ensure_slice(
    data_dir: &DataDir,
    source_path: &Path,
    source_id: &str,
    hashes: &ModelHashes,
    range: &Range<u32>,
) -> Result<PathBuf, CacheError> {
    if range.start == 0 && range.end == hashes.n_layers {
        // The whole model needs no slicing.
        return Ok(source_path.to_path_buf());
    }
    let path = data_dir.slice(source_id, range);
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
