//! The manifest of a model fetched from peers: taken from the data dir's
//! cache when it verifies there, else from the first peer whose signed
//! manifest reproduces the model id together with the vocabulary.

use std::time::Duration;

use nakshatra_slicer::{Manifest, SliceError};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, SignedBlob, MANIFEST_DOMAIN, MANIFEST_PROTOCOL,
    MAX_MANIFEST_BYTES,
};
use nakshatra_swarm::protocol::RecordError;
use nakshatra_swarm::PeerId;

use crate::datadir::{write_atomic, DataDir};
use crate::net::{Refusal, RequestError};
use crate::vocab::VocabError;

/// How long a peer may take to answer a manifest request.
pub const MANIFEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why one peer's manifest was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerManifestError {
    /// The request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The peer does not serve this model.
    #[error("has no manifest for this model")]
    NotHere,
    /// The signature does not verify, or is not the peer's.
    #[error("manifest signature: {0}")]
    Signature(#[source] RecordError),
    /// The signed body does not decode.
    #[error("manifest does not decode: {0}")]
    Decode(#[source] RecordError),
    /// It does not reproduce the model id with the vocabulary.
    #[error("manifest does not match the model id: {0}")]
    Mismatch(#[source] SliceError),
}

/// Why no verified manifest could be had.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The vocabulary (needed to verify the manifest) could not be had.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// No peer to ask.
    #[error("no valid manifest for model {model}: no peer answered")]
    NoPeers {
        /// The model.
        model: String,
    },
    /// Every peer was asked; the last one and why its manifest was
    /// refused.
    #[error("no valid manifest for model {model}: {refusal}")]
    Refused {
        /// The model.
        model: String,
        /// The last peer asked, and why.
        #[source]
        refusal: Box<Refusal<PeerManifestError>>,
    },
    /// A cache file could not be read or written.
    #[error("{path}: {source}")]
    Cache {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest could not be encoded for the cache.
    #[error("encoding the manifest: {0}")]
    Encode(#[source] RecordError),
}

/// The model's manifest and vocabulary, verified against `model_id`: each
/// from the data dir's cache when it verifies there (the vocabulary lives
/// in the same cache `node ask` uses), else from `peers`.
pub async fn manifest_and_vocab(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    data_dir: &DataDir,
) -> Result<(Manifest, Vec<u8>), ManifestError> {
    let vocab_path = crate::vocab::fetch(swarm, peers, model_id, data_dir).await?;
    let cache_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Cache { path, source }
    };
    let vocab = std::fs::read(&vocab_path).map_err(cache_err(&vocab_path))?;
    let mpath = data_dir.manifest(model_id);
    if let Ok(m) = std::fs::read(&mpath) {
        let cached = nakshatra_swarm::protocol::decode::<Manifest>(&m, MAX_MANIFEST_BYTES);
        if let Ok(manifest) = cached {
            if manifest.verify(model_id, &vocab).is_ok() {
                return Ok((manifest, vocab));
            }
        }
        tracing::warn!("cached manifest of {model_id} does not verify; fetching it again");
    }
    let mut last = None;
    for &peer in peers {
        match from_peer(swarm, peer, model_id, &vocab).await {
            Ok(m) => {
                let bytes = nakshatra_swarm::protocol::encode(&m).map_err(ManifestError::Encode)?;
                write_atomic(&mpath, &bytes).map_err(cache_err(&mpath))?;
                return Ok((m, vocab));
            }
            Err(source) => {
                tracing::warn!(%peer, "manifest refused: {source}");
                last = Some((peer, source));
            }
        }
    }
    let model = model_id.to_string();
    Err(match last {
        Some((peer, source)) => ManifestError::Refused {
            model,
            refusal: Refusal::boxed(peer, source),
        },
        None => ManifestError::NoPeers { model },
    })
}

/// One peer's manifest, signature and content verified.
async fn from_peer(
    swarm: &nakshatra_swarm::Client,
    peer: PeerId,
    model_id: &str,
    vocab: &[u8],
) -> Result<Manifest, PeerManifestError> {
    let req = ManifestRequest {
        model_id: model_id.to_string(),
    };
    let (resp, payload): (ManifestResponse, Vec<u8>) = crate::net::request(
        swarm,
        peer,
        MANIFEST_PROTOCOL,
        &req,
        MAX_MANIFEST_BYTES,
        MANIFEST_REQUEST_TIMEOUT,
    )
    .await?;
    if resp != ManifestResponse::Manifest {
        return Err(PeerManifestError::NotHere);
    }
    let (_, body) = SignedBlob::verify(&payload, MANIFEST_DOMAIN, Some(&peer), MAX_MANIFEST_BYTES)
        .map_err(PeerManifestError::Signature)?;
    let m: Manifest = nakshatra_swarm::protocol::decode(&body, MAX_MANIFEST_BYTES)
        .map_err(PeerManifestError::Decode)?;
    m.verify(model_id, vocab)
        .map_err(PeerManifestError::Mismatch)?;
    Ok(m)
}
