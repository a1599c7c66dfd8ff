//! The data directory: every path a node keeps state under, spelled out
//! once, and the one way files that must never be seen half-written are
//! written.
//!
//! ```text
//! <data dir>/
//!   identity.key                        libp2p ed25519 key, mode 0600 (a restarted node keeps its PeerId)
//!   slices/<model id>/<a>-<b>.gguf      cached slices (a first slice has <a>-<b>.gguf.embd.gguf beside it)
//!   models/<model id>/manifest.bin      the verified manifest of a model fetched from peers
//!   models/<model id>/pieces/<piece>.part   bytes of a piece still arriving (resumed after a crash)
//!   models/<model id>/pieces/<piece>.bin    a verified piece (re-hashed before every use)
//!   vocab/<model id>.gguf               the vocabulary-only GGUF, verified against the model id
//!   vocab/<model id>.hashes             the model hashes that verification needs
//! ```

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use nakshatra_slicer::PieceId;

/// A node's data directory (see the module doc for its layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (not created here: each writer creates
    /// the folders it writes into).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The platform's data directory for nakshatra
    /// (`~/.local/share/nakshatra` on Linux; `.nakshatra` when the platform
    /// has none).
    pub fn platform_default() -> Self {
        Self::new(
            directories::ProjectDirs::from("", "", "nakshatra")
                .map(|d| d.data_dir().to_path_buf())
                .unwrap_or_else(|| PathBuf::from(".nakshatra")),
        )
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This node's persistent libp2p identity.
    pub fn identity_key(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// The cached slice `range` of model `model_id`.
    pub fn slice(&self, model_id: &str, range: &Range<u32>) -> PathBuf {
        self.root
            .join("slices")
            .join(model_id)
            .join(format!("{}-{}.gguf", range.start, range.end))
    }

    /// The verified manifest of model `model_id`.
    pub fn manifest(&self, model_id: &str) -> PathBuf {
        self.model_dir(model_id).join("manifest.bin")
    }

    /// Where the pieces of model `model_id` are fetched to.
    pub fn pieces(&self, model_id: &str) -> PieceDir {
        PieceDir(self.model_dir(model_id).join("pieces"))
    }

    /// What `node ask` remembers about the peers it used: measured speeds
    /// and recent failures (see `ask::memory`).
    pub fn peer_memory(&self) -> PathBuf {
        self.root.join("peers.json")
    }

    /// The vocabulary-only GGUF of model `model_id`.
    pub fn vocab_gguf(&self, model_id: &str) -> PathBuf {
        self.root.join("vocab").join(format!("{model_id}.gguf"))
    }

    /// The encoded model hashes that verify [`DataDir::vocab_gguf`].
    pub fn vocab_hashes(&self, model_id: &str) -> PathBuf {
        self.root.join("vocab").join(format!("{model_id}.hashes"))
    }

    fn model_dir(&self, model_id: &str) -> PathBuf {
        self.root.join("models").join(model_id)
    }
}

/// The folder a model's pieces are fetched into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceDir(PathBuf);

impl PieceDir {
    /// A piece folder at `path` (tests and benches; nodes use
    /// [`DataDir::pieces`]).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A verified piece.
    pub fn bin(&self, id: &PieceId) -> PathBuf {
        self.0.join(format!("{id}.bin"))
    }

    /// A piece still arriving.
    pub fn part(&self, id: &PieceId) -> PathBuf {
        self.0.join(format!("{id}.part"))
    }
}

/// Writes `bytes` to `path` through a temporary file beside it, fsync and
/// rename, creating the parent folder: never a half-written file under the
/// final name. On error the temporary file is removed and the error is
/// returned as is (the caller names the path).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A name per write, not only per process: two tasks of one process
    // (concurrent asks caching the same vocabulary) must not share one.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let d = DataDir::new("/d");
        assert_eq!(d.identity_key(), Path::new("/d/identity.key"));
        assert_eq!(d.slice("m", &(0..10)), Path::new("/d/slices/m/0-10.gguf"));
        assert_eq!(d.manifest("m"), Path::new("/d/models/m/manifest.bin"));
        let p = d.pieces("m");
        assert_eq!(
            p.bin(&PieceId::Block(3)),
            Path::new("/d/models/m/pieces/blk.3.bin")
        );
        assert_eq!(
            p.part(&PieceId::Embd),
            Path::new("/d/models/m/pieces/token_embd.part")
        );
        assert_eq!(d.vocab_gguf("m"), Path::new("/d/vocab/m.gguf"));
        assert_eq!(d.vocab_hashes("m"), Path::new("/d/vocab/m.hashes"));
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.bin");
        write_atomic(&p, b"abc").unwrap();
        write_atomic(&p, b"defg").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"defg");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.bin")]);
    }
}
