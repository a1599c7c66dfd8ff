//! The vocabulary, both ways (`/nakshatra/vocab/1`): a serving node hands
//! out its model's vocabulary-only GGUF with the model hashes; an asker or
//! a fetching node takes it from the first peer whose copy verifies
//! against the model id, and caches it in the data dir.

use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt;
use nakshatra_slicer::{ModelHashes, SliceError};
use nakshatra_swarm::protocol::act::{VocabRequest, VocabResponse, VOCAB_PROTOCOL};
use nakshatra_swarm::protocol::RecordError;
use nakshatra_swarm::{PeerId, StreamProtocol};

use crate::datadir::{write_atomic, DataDir};
use crate::net::{read_message, write_frame, FrameError, Refusal, RequestError};

/// How long a peer may take to answer a vocabulary request (a few MB).
pub const VOCAB_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a serving node waits for the request on a vocabulary stream.
const VOCAB_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest vocabulary-only GGUF accepted from a peer (the largest real
/// vocabularies, 256k tokens with merges and scores, are about 20 MB).
pub const MAX_VOCAB_BYTES: usize = 64 << 20;
/// Vocabulary requests one peer may have open at once (an asker makes
/// one).
const VOCAB_STREAMS_PER_PEER: usize = 2;
/// Largest encoded [`ModelHashes`] accepted (one hash per block).
pub const MAX_HASHES_BYTES: usize = 1 << 24;

/// What a serving node hands to askers: the vocabulary-only GGUF and the
/// encoded model hashes that let the asker check it against the model id.
#[derive(Debug, Clone)]
pub struct VocabOffer {
    /// The model the vocabulary belongs to.
    pub model_id: String,
    /// The vocabulary-only GGUF (every metadata key, no tensors).
    pub gguf: Arc<Vec<u8>>,
    /// `ModelHashes`, encoded.
    pub hashes: Arc<Vec<u8>>,
}

impl VocabOffer {
    /// The offer for `model_id` with this vocabulary and these hashes.
    pub fn new(model_id: String, gguf: Vec<u8>, hashes: &ModelHashes) -> Result<Self, VocabError> {
        let hashes = nakshatra_swarm::protocol::encode(hashes).map_err(VocabError::Encode)?;
        Ok(Self {
            model_id,
            gguf: Arc::new(gguf),
            hashes: Arc::new(hashes),
        })
    }
}

/// Why one peer's vocabulary was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerVocabError {
    /// The request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The peer does not serve this model.
    #[error("peer has no vocabulary to give")]
    NotHere,
    /// The hashes it sent do not decode.
    #[error("bad hashes: {0}")]
    Hashes(#[source] RecordError),
    /// The vocabulary does not reproduce the model id.
    #[error(transparent)]
    Verify(SliceError),
}

/// Why no verified vocabulary could be had.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    /// Not cached, and no peer to ask.
    #[error("vocabulary: no serving peer to ask")]
    NoPeers,
    /// Every peer was asked; the last one and why its copy was refused.
    #[error("vocabulary: {0}")]
    Refused(#[source] Box<Refusal<PeerVocabError>>),
    /// The cache could not be read or written.
    #[error("vocabulary cache {path}: {source}")]
    Cache {
        /// The cache file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The model hashes could not be encoded.
    #[error("vocabulary: encoding the model hashes: {0}")]
    Encode(#[source] RecordError),
}

/// Answers `/nakshatra/vocab/1` streams with `offer` until the swarm stops.
pub fn spawn_server(
    swarm: &nakshatra_swarm::Client,
    offer: VocabOffer,
) -> Result<(), nakshatra_swarm::stream::AlreadyRegistered> {
    let offer = Arc::new(offer);
    // Served for good: a node that moves keeps its model.
    let _served = swarm.serve_protocol(
        StreamProtocol::new(VOCAB_PROTOCOL),
        VOCAB_STREAMS_PER_PEER,
        move |peer, stream| {
            let offer = offer.clone();
            async move {
                if let Err(e) = serve(&offer, stream).await {
                    tracing::debug!(%peer, "vocab request failed: {e}");
                }
            }
        },
    )?;
    Ok(())
}

/// Why one vocabulary request could not be answered.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("no request within {VOCAB_READ_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

async fn serve(offer: &VocabOffer, mut s: nakshatra_swarm::Stream) -> Result<(), ServeError> {
    let req: VocabRequest = tokio::time::timeout(VOCAB_READ_TIMEOUT, read_message(&mut s))
        .await
        .map_err(|_| ServeError::Timeout)??;
    if req.model_id == offer.model_id {
        let h = VocabResponse::Vocab {
            hashes: offer.hashes.as_ref().clone(),
        };
        write_frame(&mut s, &h, &offer.gguf).await?;
    } else {
        write_frame(&mut s, &VocabResponse::NotHere, &[]).await?;
    }
    let _ = s.close().await;
    Ok(())
}

/// The vocabulary-only GGUF of `model_id`, verified against the model id:
/// from the data dir's cache when it verifies there, else from the first
/// of `peers` whose copy verifies (then cached). Returns its path.
pub async fn fetch(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    data_dir: &DataDir,
) -> Result<std::path::PathBuf, VocabError> {
    let path = data_dir.vocab_gguf(model_id);
    let hashes_path = data_dir.vocab_hashes(model_id);
    if let (Ok(gguf), Ok(hashes)) = (std::fs::read(&path), std::fs::read(&hashes_path)) {
        if verify(&gguf, &hashes, model_id).is_ok() {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached vocabulary does not verify; fetching again");
    }
    let mut last = None;
    for &peer in peers {
        match from_peer(swarm, peer, model_id).await {
            Ok((hashes, gguf)) => {
                let cache = |p: &std::path::Path, b: &[u8]| {
                    write_atomic(p, b).map_err(|source| VocabError::Cache {
                        path: p.to_path_buf(),
                        source,
                    })
                };
                cache(&path, &gguf)?;
                cache(&hashes_path, &hashes)?;
                return Ok(path);
            }
            Err(source) => {
                tracing::warn!(%peer, "vocabulary refused: {source}");
                last = Some(VocabError::Refused(Refusal::boxed(peer, source)));
            }
        }
    }
    Err(last.unwrap_or(VocabError::NoPeers))
}

/// One peer's vocabulary and encoded hashes, verified.
async fn from_peer(
    swarm: &nakshatra_swarm::Client,
    peer: PeerId,
    model_id: &str,
) -> Result<(Vec<u8>, Vec<u8>), PeerVocabError> {
    let req = VocabRequest {
        model_id: model_id.to_string(),
    };
    let (resp, gguf) = crate::net::request(
        swarm,
        peer,
        VOCAB_PROTOCOL,
        &req,
        MAX_VOCAB_BYTES,
        VOCAB_REQUEST_TIMEOUT,
    )
    .await?;
    let VocabResponse::Vocab { hashes } = resp else {
        return Err(PeerVocabError::NotHere);
    };
    verify(&gguf, &hashes, model_id)?;
    Ok((hashes, gguf))
}

/// Checks a peer's answer: `hashes` (encoded [`ModelHashes`]) decode, and
/// `gguf` is the vocabulary of `model_id` with those hashes
/// ([`nakshatra_slicer::verify_vocab`]). Every vocabulary taken from a
/// peer or the cache goes through here (public for the fuzz tests).
pub fn verify(gguf: &[u8], hashes: &[u8], model_id: &str) -> Result<(), PeerVocabError> {
    let hashes: ModelHashes = nakshatra_swarm::protocol::decode(hashes, MAX_HASHES_BYTES)
        .map_err(PeerVocabError::Hashes)?;
    nakshatra_slicer::verify_vocab(gguf, model_id, &hashes).map_err(PeerVocabError::Verify)?;
    Ok(())
}
