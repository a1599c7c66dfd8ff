//! The manifest of a model fetched from peers: taken from the data dir's
//! cache when it verifies there, else from the first peer whose signed
//! manifest reproduces the model id together with the vocabulary. Peers
//! are asked side by side ([`MANIFEST_HEDGE`], [`MANIFEST_PARALLEL`]) and a
//! peer silent for [`MANIFEST_FIRST_BYTE`] is given up, so peers that
//! never answer do not add their timeouts one after another.
//!
//! The verified manifest is also where a node learns the model's shape
//! ([`model_shape`]): its layer count and architecture, which the swarm
//! view and the planner take from here rather than from a vote of
//! announcers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::AsyncWriteExt;
use nakshatra_swarm::{ModelShape, Reopen, StreamProtocol};

use nakshatra_slicer::{Manifest, SliceError};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, SignedBlob, MANIFEST_DOMAIN, MANIFEST_PROTOCOL,
    MAX_MANIFEST_BYTES,
};
use nakshatra_swarm::protocol::RecordError;
use nakshatra_swarm::PeerId;

use crate::datadir::{write_atomic, DataDir};
use crate::net::{handshake, read_frame, write_frame, Refusal, RequestError};
use crate::vocab::VocabError;

/// How long a peer may take to answer a manifest request.
pub const MANIFEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Without a verified manifest this long after the last request went
/// out, the next peer is asked as well (an honest peer answers in
/// milliseconds; a silent one no longer holds the others up).
pub const MANIFEST_HEDGE: Duration = Duration::from_millis(500);
/// Manifest requests in flight at once at most (each answer may be up to
/// `MAX_MANIFEST_BYTES`, so this bounds the memory a fetch of the
/// manifest can take: 64 MiB).
pub const MANIFEST_PARALLEL: usize = 4;
/// A peer that has sent no byte of its answer this long after the request
/// started (connecting included) is given up, freeing its place for the
/// next peer: an honest one answers a manifest request in milliseconds,
/// so a silent peer costs this, not [`MANIFEST_REQUEST_TIMEOUT`].
pub const MANIFEST_FIRST_BYTE: Duration = Duration::from_secs(3);

/// Why one peer's manifest was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerManifestError {
    /// The request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Not a byte of an answer in time.
    #[error("no answer within {0:?}")]
    Silent(Duration),
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
    // Ask one peer; another after every failure, or when no answer came
    // within MANIFEST_HEDGE; at most MANIFEST_PARALLEL at once.
    let mut last = None;
    let mut waiting = peers.iter().copied();
    let mut asked = FuturesUnordered::new();
    let ask = |peer: PeerId| {
        let vocab = &vocab;
        async move { (peer, from_peer(swarm, peer, model_id, vocab).await) }
    };
    loop {
        if asked.len() < MANIFEST_PARALLEL {
            if let Some(peer) = waiting.next() {
                asked.push(ask(peer));
            }
        }
        if asked.is_empty() {
            break;
        }
        let answer = match tokio::time::timeout(MANIFEST_HEDGE, asked.next()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => break,
            // Nothing yet: the next peer is asked too.
            Err(_) => continue,
        };
        match answer {
            (_, Ok(m)) => {
                drop(asked);
                let bytes = nakshatra_swarm::protocol::encode(&m).map_err(ManifestError::Encode)?;
                write_atomic(&mpath, &bytes).map_err(cache_err(&mpath))?;
                return Ok((m, vocab));
            }
            (peer, Err(source)) => {
                match &source {
                    // A peer that cannot be reached or says nothing.
                    PeerManifestError::Request(_)
                    | PeerManifestError::Silent(_)
                    | PeerManifestError::NotHere => {
                        tracing::debug!(%peer, "no manifest: {source}")
                    }
                    _ => tracing::warn!(%peer, "manifest refused: {source}"),
                }
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

/// The shape a verified manifest gives a model (what the swarm view and
/// the planner hold announcements to).
pub fn shape_of(m: &Manifest) -> ModelShape {
    ModelShape {
        n_layers: m.n_layers,
        arch: m.arch.clone(),
    }
}

/// The shape of `model_id` from its verified manifest: the data dir's
/// cache when it verifies there (no network), else the vocabulary and
/// manifest from the model's servers, verified against the model id and
/// cached ([`manifest_and_vocab`]). This is what `node ask` plans with:
/// the layer count is never taken from what announcers claim.
pub async fn model_shape(
    swarm: &nakshatra_swarm::Client,
    model_id: &str,
    data_dir: &DataDir,
) -> Result<ModelShape, ManifestError> {
    // The cache first: no lookup when it is there.
    if let Ok((m, _)) = manifest_and_vocab(swarm, &[], model_id, data_dir).await {
        return Ok(shape_of(&m));
    }
    let peers = swarm.model_peers(model_id).await.unwrap_or_default();
    let (m, _) = manifest_and_vocab(swarm, &peers, model_id, data_dir).await?;
    Ok(shape_of(&m))
}

/// One peer's manifest, signature and content verified. Given up when
/// the peer sends no byte within [`MANIFEST_FIRST_BYTE`], or the whole
/// exchange takes over [`MANIFEST_REQUEST_TIMEOUT`].
async fn from_peer(
    swarm: &nakshatra_swarm::Client,
    peer: PeerId,
    model_id: &str,
    vocab: &[u8],
) -> Result<Manifest, PeerManifestError> {
    let req = ManifestRequest {
        model_id: model_id.to_string(),
    };
    let meter = Arc::new(super::Meter::new(Instant::now()));
    let exchange = swarm.open_stream_with(
        peer,
        StreamProtocol::new(MANIFEST_PROTOCOL),
        Reopen::DEFAULT,
        |s| {
            let (req, meter) = (&req, meter.clone());
            async move {
                let mut s = super::Metered::new(s, meter);
                write_frame(&mut s, req, &[]).await.map_err(handshake)?;
                let answer: (ManifestResponse, Vec<u8>) = read_frame(&mut s, MAX_MANIFEST_BYTES)
                    .await
                    .map_err(handshake)?;
                let _ = s.close().await;
                Ok(answer)
            }
        },
    );
    let exchange = tokio::time::timeout(MANIFEST_REQUEST_TIMEOUT, exchange);
    tokio::pin!(exchange);
    let answer = tokio::select! {
        a = &mut exchange => a,
        () = tokio::time::sleep(MANIFEST_FIRST_BYTE) => {
            if meter.bytes() == 0 {
                return Err(PeerManifestError::Silent(MANIFEST_FIRST_BYTE));
            }
            // It is answering: let it finish.
            exchange.await
        }
    };
    let (resp, payload) = answer
        .map_err(|_| RequestError::Timeout(MANIFEST_REQUEST_TIMEOUT))?
        .map_err(RequestError::from)?;
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
