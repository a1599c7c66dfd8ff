//! The serving side of fetching: `/nakshatra/manifest/1` hands out the
//! node's signed manifest, `/nakshatra/piece/1` answers chunk requests
//! with bytes sent straight from the mapped GGUF files (no copy).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt;
use nakshatra_slicer::{Gguf, Manifest, PieceId, SliceError};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, PieceRef, PieceRequest, PieceResponse, SignedBlob,
    MANIFEST_DOMAIN, MANIFEST_PROTOCOL, MAX_CHUNK_BYTES, PIECE_PROTOCOL,
};
use nakshatra_swarm::protocol::RecordError;
use nakshatra_swarm::{PeerId, Stream, StreamProtocol};

use crate::faults::Faults;
use crate::net::{read_message, write_frame, write_frame_parts, FrameError};

/// How long a manifest stream may take to send its request.
const MANIFEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a piece stream may stay silent between requests before it is
/// closed (a fetcher keeps its streams busy).
const PIECE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Manifest requests one peer may have open at once.
const MANIFEST_STREAMS_PER_PEER: usize = 2;
/// Piece streams one peer may have open at once: a fetcher opens
/// [`super::STREAMS_PER_PEER`], and one lost stream may linger while its
/// replacement opens.
const PIECE_STREAMS_PER_PEER: usize = 2 * super::STREAMS_PER_PEER;

/// Why a [`PieceStore`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The manifest does not encode.
    #[error("encoding the manifest: {0}")]
    Encode(#[source] RecordError),
    /// A file to serve from cannot be opened or parsed.
    #[error(transparent)]
    Open(#[from] SliceError),
}

/// Why the piece servers could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve {protocol}: {source}")]
pub struct ServeError {
    /// The protocol already served.
    protocol: &'static str,
    /// The stream layer's refusal.
    #[source]
    source: nakshatra_swarm::stream::AlreadyRegistered,
}

/// What a node can hand out: its signed manifest and the GGUF files it
/// holds pieces in.
pub struct PieceStore {
    /// The model whose pieces these are.
    pub model_id: String,
    /// Encoded `SignedBlob` of the manifest, signed by this node.
    pub signed_manifest: Vec<u8>,
    /// The manifest the pieces are checked against.
    pub manifest: Manifest,
    /// Mapped files holding pieces (the full model, or a slice and its
    /// sidecar), with the pieces each holds.
    pub files: Vec<(Gguf, Vec<PieceId>)>,
    /// Test-only faults (a slow link, corrupt, stalled or trickled chunks).
    faults: Faults,
}

impl PieceStore {
    /// A store over the files at `paths`, signing the manifest with `key`.
    pub fn new(
        manifest: Manifest,
        key: &ed25519_dalek::SigningKey,
        paths: &[PathBuf],
        faults: Faults,
    ) -> Result<Self, StoreError> {
        let payload = nakshatra_swarm::protocol::encode(&manifest).map_err(StoreError::Encode)?;
        let signed = SignedBlob::sign(key, MANIFEST_DOMAIN, payload);
        let signed_manifest =
            nakshatra_swarm::protocol::encode(&signed).map_err(StoreError::Encode)?;
        let mut files = Vec::new();
        for p in paths {
            let g = Gguf::open(p).map_err(SliceError::from)?;
            let held = nakshatra_slicer::pieces_held(&g, &manifest);
            files.push((g, held));
        }
        Ok(Self {
            model_id: manifest.model_id.clone(),
            signed_manifest,
            manifest,
            files,
            faults,
        })
    }

    /// Bytes `offset..offset+len` of a piece, as slices of the mapped
    /// files (no copy), and the piece's length. `None`: not held.
    fn parts(&self, id: &PieceId, offset: u64, len: u64) -> Option<(Vec<&[u8]>, u64)> {
        let piece = self.manifest.piece(id)?;
        let (g, _) = self.files.iter().find(|(_, held)| held.contains(id))?;
        let segs = nakshatra_slicer::piece_segments(g, piece).ok()?;
        let total = piece.n_bytes;
        let end = offset.saturating_add(len).min(total);
        let mut out = Vec::new();
        let mut at = 0u64;
        for s in segs {
            let (s0, s1) = (at, at + s.len() as u64);
            let (a, b) = (offset.max(s0), end.min(s1));
            if a < b {
                out.push(s.get((a - s0) as usize..(b - s0) as usize)?);
            }
            at = s1;
        }
        Some((out, total))
    }

    /// Reads one byte of every page of a range, so that sending it from the
    /// async runtime does not wait for the disk. `None`: not held.
    fn prefault(&self, id: &PieceId, offset: u64, len: u64) -> Option<()> {
        let (parts, _) = self.parts(id, offset, len)?;
        let mut x = 0u8;
        for p in parts {
            for b in p.iter().step_by(4096) {
                x ^= *b;
            }
        }
        std::hint::black_box(x);
        Some(())
    }

    /// Piece ids this node can serve.
    pub fn held(&self) -> HashSet<PieceId> {
        self.files
            .iter()
            .flat_map(|(_, h)| h.iter().cloned())
            .collect()
    }

    /// Answers one piece request.
    async fn answer(self: &Arc<Self>, s: &mut Stream, req: PieceRequest) -> Result<(), FrameError> {
        self.faults.link_delay().await;
        if req.model_id != self.model_id {
            return write_frame(s, &PieceResponse::NotHere, &[]).await;
        }
        if req.len > MAX_CHUNK_BYTES {
            let resp = PieceResponse::Error {
                message: format!("chunk of {} bytes over {MAX_CHUNK_BYTES}", req.len),
            };
            return write_frame(s, &resp, &[]).await;
        }
        let id = piece_id(req.piece);
        let store = self.clone();
        let held = tokio::task::spawn_blocking(move || store.prefault(&id, req.offset, req.len))
            .await
            .ok()
            .flatten()
            .is_some();
        match self.parts(&id, req.offset, req.len).filter(|_| held) {
            Some((parts, total)) => {
                let resp = PieceResponse::Data { total };
                if let Some(r) = self.faults.trickle(s, &resp, &parts).await {
                    return r;
                }
                match self.faults.corrupt_chunk(&parts) {
                    Some(bad) => write_frame(s, &resp, &bad).await,
                    None => write_frame_parts(s, &resp, &parts).await,
                }
            }
            None => write_frame(s, &PieceResponse::NotHere, &[]).await,
        }
    }
}

/// Serves `/nakshatra/manifest/1` and `/nakshatra/piece/1` from `store`
/// until the swarm stops or the returned accept loops are stopped (a node
/// that moves to another range serves its new slice's pieces).
pub fn spawn_piece_servers(
    swarm: &nakshatra_swarm::Client,
    store: Arc<PieceStore>,
) -> Result<[nakshatra_swarm::Served; 2], ServeError> {
    let err = |protocol| move |source| ServeError { protocol, source };
    let s = store.clone();
    let manifest = swarm
        .serve_protocol(
            StreamProtocol::new(MANIFEST_PROTOCOL),
            MANIFEST_STREAMS_PER_PEER,
            move |_, stream| serve_manifest(s.clone(), stream),
        )
        .map_err(err(MANIFEST_PROTOCOL))?;
    let pieces = swarm
        .serve_protocol(
            StreamProtocol::new(PIECE_PROTOCOL),
            PIECE_STREAMS_PER_PEER,
            move |peer, stream| serve_pieces(store.clone(), peer, stream),
        )
        .map_err(err(PIECE_PROTOCOL))?;
    Ok([manifest, pieces])
}

async fn serve_manifest(store: Arc<PieceStore>, mut stream: Stream) {
    if store.faults.stall(&mut stream).await {
        return;
    }
    let req = tokio::time::timeout(
        MANIFEST_READ_TIMEOUT,
        read_message::<_, ManifestRequest>(&mut stream),
    )
    .await;
    if let Ok(Ok(req)) = req {
        let r = if req.model_id == store.model_id {
            write_frame(
                &mut stream,
                &ManifestResponse::Manifest,
                &store.signed_manifest,
            )
            .await
        } else {
            write_frame(&mut stream, &ManifestResponse::NotHere, &[]).await
        };
        if r.is_ok() {
            let _ = stream.close().await;
        }
    }
}

async fn serve_pieces(store: Arc<PieceStore>, peer: PeerId, mut stream: Stream) {
    if store.faults.stall(&mut stream).await {
        return;
    }
    loop {
        let req = tokio::time::timeout(
            PIECE_IDLE_TIMEOUT,
            read_message::<_, PieceRequest>(&mut stream),
        )
        .await;
        let Ok(Ok(req)) = req else { break };
        if store.answer(&mut stream, req).await.is_err() {
            break;
        }
    }
    tracing::debug!(%peer, "piece stream closed");
}

fn piece_id(r: PieceRef) -> PieceId {
    match r {
        PieceRef::Block(i) => PieceId::Block(i),
        PieceRef::Embd => PieceId::Embd,
        PieceRef::Head => PieceId::Head,
        PieceRef::Globals => PieceId::Globals,
    }
}
