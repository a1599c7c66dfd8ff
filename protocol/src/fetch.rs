//! Fetching a model's pieces from peers: the signed manifest and the piece
//! transfer protocol.
//!
//! * [`MANIFEST_PROTOCOL`]: [`ManifestRequest`] → [`ManifestResponse`] with
//!   the manifest (the slicer's `Manifest`, bincode) inside a
//!   [`SignedBlob`] of domain [`MANIFEST_DOMAIN`], signed by the serving
//!   node's key. The fetcher checks the signature and its binding to the
//!   peer it asked, then — what makes a stranger's manifest trustworthy —
//!   recomputes the model id from the manifest's hashes and the
//!   vocabulary's metadata.
//! * [`PIECE_PROTOCOL`]: on one stream, any number of [`PieceRequest`]s
//!   (`offset`, `len` within one piece's byte stream), each answered by a
//!   [`PieceResponse`] header with the bytes as the frame payload. Pieces
//!   are verified by the fetcher against the manifest's BLAKE3 hash.
//!
//! Frames are the same `u32 length, header, u32 length, payload` frames as
//! the activation protocol (see [`crate::act`]).

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{peer_id_of, PeerId, RecordError};

/// Manifest protocol id.
pub const MANIFEST_PROTOCOL: &str = "/nakshatra/manifest/1";
/// Piece transfer protocol id.
pub const PIECE_PROTOCOL: &str = "/nakshatra/piece/1";
/// Signing domain of manifests.
pub const MANIFEST_DOMAIN: &str = "nakshatra/manifest/1";
/// Largest chunk one [`PieceRequest`] may ask for.
pub const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// Largest signed manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;

/// Which piece of a model (mirrors the slicer's `PieceId`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PieceRef {
    /// Every tensor of one block.
    Block(u32),
    /// The token-embedding table.
    Embd,
    /// The output head (untied models).
    Head,
    /// Every other global tensor (output norm, rope factors...).
    Globals,
}

/// Asks a node for its signed manifest of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRequest {
    /// Model id (64 hex).
    pub model_id: String,
}

/// The answer to a [`ManifestRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestResponse {
    /// The payload is a [`SignedBlob`] (bincode) whose payload is the
    /// manifest.
    Manifest,
    /// This node has no manifest for that model.
    NotHere,
}

/// Asks for `len` bytes at `offset` of a piece's byte stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    /// Model id (64 hex).
    pub model_id: String,
    /// Which piece of the model to read from.
    pub piece: PieceRef,
    /// Offset in the piece's byte stream.
    pub offset: u64,
    /// Bytes wanted (at most [`MAX_CHUNK_BYTES`]).
    pub len: u64,
}

/// The answer to a [`PieceRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceResponse {
    /// The bytes follow as the payload (fewer than asked only at the end
    /// of the piece); `total` is the piece's length.
    Data {
        /// Length of the whole piece.
        total: u64,
    },
    /// This node does not hold that piece.
    NotHere,
    /// The request was refused.
    Error {
        /// Why the serving node refused it (e.g. a chunk over
        /// [`MAX_CHUNK_BYTES`], a read error), for people.
        message: String,
    },
}

/// A payload signed by a node's ed25519 key under a domain, so a signature
/// made for one purpose is never accepted for another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBlob {
    /// What the payload is (e.g. [`MANIFEST_DOMAIN`]).
    pub domain: String,
    /// Signer's ed25519 public key; the signer's [`PeerId`] derives from it.
    pub public_key: [u8; 32],
    /// Signature over the domain and payload.
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
    /// The signed bytes, meaningful only under `domain` (for
    /// [`MANIFEST_DOMAIN`], the bincode-encoded manifest).
    pub payload: Vec<u8>,
}

mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))
    }
}

fn blob_message(domain: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + domain.len() + payload.len());
    m.extend_from_slice(b"nakshatra signed blob v1\0");
    m.extend_from_slice(&(domain.len() as u32).to_le_bytes());
    m.extend_from_slice(domain.as_bytes());
    m.extend_from_slice(payload);
    m
}

impl SignedBlob {
    /// Signs `payload` under `domain`.
    pub fn sign(key: &SigningKey, domain: &str, payload: Vec<u8>) -> Self {
        let signature = key.sign(&blob_message(domain, &payload)).to_bytes();
        SignedBlob {
            domain: domain.to_string(),
            public_key: key.verifying_key().to_bytes(),
            signature,
            payload,
        }
    }

    /// Checks the domain, the signature and (when given) that the signer is
    /// `expected_peer`; returns the signer and the payload.
    pub fn verify(
        bytes: &[u8],
        domain: &str,
        expected_peer: Option<&PeerId>,
        max_bytes: usize,
    ) -> Result<(PeerId, Vec<u8>), RecordError> {
        let blob: SignedBlob = crate::decode(bytes, max_bytes)?;
        if blob.domain != domain {
            return Err(RecordError::Malformed(format!(
                "signed for {:?}, expected {domain:?}",
                blob.domain
            )));
        }
        let key = VerifyingKey::from_bytes(&blob.public_key)
            .map_err(|e| RecordError::Malformed(format!("public key: {e}")))?;
        key.verify(
            &blob_message(&blob.domain, &blob.payload),
            &Signature::from_bytes(&blob.signature),
        )
        .map_err(|_| RecordError::BadSignature)?;
        let signer = peer_id_of(&blob.public_key)?;
        if let Some(want) = expected_peer {
            if *want != signer {
                return Err(RecordError::PeerMismatch {
                    expected: Box::new(*want),
                    signer: Box::new(signer),
                });
            }
        }
        Ok((signer, blob.payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_verify_and_refuse_forgeries() {
        let k = SigningKey::from_bytes(&[3u8; 32]);
        let other = SigningKey::from_bytes(&[4u8; 32]);
        let me = peer_id_of(&k.verifying_key().to_bytes()).unwrap();
        let b = crate::encode(&SignedBlob::sign(&k, MANIFEST_DOMAIN, b"hello".to_vec())).unwrap();
        let (signer, payload) =
            SignedBlob::verify(&b, MANIFEST_DOMAIN, Some(&me), 1 << 20).unwrap();
        assert_eq!((signer, payload), (me, b"hello".to_vec()));
        // Another domain, another signer than expected, a flipped byte.
        assert!(SignedBlob::verify(&b, "other", None, 1 << 20).is_err());
        let theirs = crate::encode(&SignedBlob::sign(
            &other,
            MANIFEST_DOMAIN,
            b"hello".to_vec(),
        ))
        .unwrap();
        assert!(matches!(
            SignedBlob::verify(&theirs, MANIFEST_DOMAIN, Some(&me), 1 << 20),
            Err(RecordError::PeerMismatch { .. })
        ));
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x01;
            assert!(
                SignedBlob::verify(&t, MANIFEST_DOMAIN, Some(&me), 1 << 20).is_err(),
                "flip at {i}"
            );
        }
        assert!(SignedBlob::verify(&b, MANIFEST_DOMAIN, None, 8).is_err());
    }
}
