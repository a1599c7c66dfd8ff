//! The node's persistent ed25519 identity.
//!
//! File format: the raw 32-byte ed25519 secret key (what
//! [`load_or_create_identity`] writes), mode 0600. A libp2p
//! protobuf-encoded ed25519 keypair is accepted too when reading.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::SigningKey;
use libp2p::identity::Keypair;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading, creating or writing the key file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The key file being read or created.
        path: PathBuf,
        /// What the OS reported.
        source: io::Error,
    },
    /// The file exists but holds no usable key. It is left untouched:
    /// replacing it would silently change the node's PeerId.
    #[error(
        "identity file {path} is corrupt ({reason}); it is left as is: move it away to \
         create a new identity (the node's PeerId will change)"
    )]
    Corrupt {
        /// The key file, left untouched.
        path: PathBuf,
        /// What is wrong with its content (a length that is no known key
        /// format, a key that does not decode, a non-ed25519 key).
        reason: String,
    },
    /// The keypair is not ed25519.
    #[error("the identity is not an ed25519 key")]
    NotEd25519,
}

/// Loads the node identity from `path`, or creates it there if the file
/// does not exist: a fresh ed25519 key, written atomically (temporary file,
/// then a hard link that never replaces an existing file) with mode 0600 on
/// Unix, so a restarted node keeps its PeerId. A corrupt file is an error,
/// never overwritten.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, IdentityError> {
    match fs::read(path) {
        Ok(bytes) => {
            warn_if_loose(path);
            decode(path, bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(path),
        Err(source) => Err(IdentityError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The ed25519-dalek signing key of `keypair` (same secret), used to sign
/// [`nakshatra_protocol::ServerInfo`] records.
pub fn signing_key(keypair: &Keypair) -> Result<SigningKey, IdentityError> {
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| IdentityError::NotEd25519)?;
    // `to_bytes` is secret (32 bytes) followed by public (32 bytes).
    let bytes = ed.to_bytes();
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&bytes[..32]);
    Ok(SigningKey::from_bytes(&secret))
}

fn decode(path: &Path, mut bytes: Vec<u8>) -> Result<Keypair, IdentityError> {
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() == 32 {
        return Keypair::ed25519_from_bytes(&mut bytes).map_err(|e| corrupt(e.to_string()));
    }
    match Keypair::from_protobuf_encoding(&bytes) {
        Ok(kp) if kp.clone().try_into_ed25519().is_ok() => Ok(kp),
        Ok(_) => Err(corrupt("a libp2p keypair, but not ed25519".into())),
        Err(_) => Err(corrupt(format!(
            "{} bytes: expected a 32-byte ed25519 secret key or a libp2p protobuf keypair",
            bytes.len()
        ))),
    }
}

fn create(path: &Path) -> Result<Keypair, IdentityError> {
    let io_err = |source: io::Error| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let keypair = Keypair::generate_ed25519();
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| IdentityError::NotEd25519)?;
    let secret = &ed.to_bytes()[..32];

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}.{nanos}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(secret)?;
        f.sync_all()?;
        drop(f);
        // A hard link never replaces an existing file: if another process
        // created the identity meanwhile, keep theirs.
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => {
            sync_parent(path);
            tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created a new node identity");
            Ok(keypair)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let bytes = fs::read(path).map_err(io_err)?;
            decode(path, bytes)
        }
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(unix)]
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(not(unix))]
fn sync_parent(_: &Path) {}

#[cfg(unix)]
fn warn_if_loose(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "identity file is accessible to other users; run chmod 600 on it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_loose(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/identity.key");
        let a = load_or_create_identity(&path).unwrap();
        let b = load_or_create_identity(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn signing_key_matches_peer_id() {
        let kp = Keypair::generate_ed25519();
        let sk = signing_key(&kp).unwrap();
        let peer = nakshatra_protocol::peer_id_of(&sk.verifying_key().to_bytes()).unwrap();
        assert_eq!(peer, kp.public().to_peer_id());
    }

    #[test]
    fn protobuf_keypair_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let kp = Keypair::generate_ed25519();
        fs::write(&path, kp.to_protobuf_encoding().unwrap()).unwrap();
        let loaded = load_or_create_identity(&path).unwrap();
        assert_eq!(loaded.public().to_peer_id(), kp.public().to_peer_id());
    }

    #[test]
    fn corrupt_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        for junk in [&b""[..], b"hello", &[0xffu8; 33][..], &[1u8; 64][..]] {
            fs::write(&path, junk).unwrap();
            let err = load_or_create_identity(&path).unwrap_err();
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("move it away"), "{err}");
            assert_eq!(
                fs::read(&path).unwrap(),
                junk,
                "file must be left untouched"
            );
        }
    }

    #[test]
    fn unreadable_location_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let path = dir.path().join("identity.key");
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            load_or_create_identity(&path),
            Err(IdentityError::Io { .. })
        ));
    }
}
