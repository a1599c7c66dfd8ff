//! The signed envelope around a [`ServerInfo`], and its verification.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::{
    wire, ServerInfo, MAX_CLOCK_SKEW_MS, MAX_RECORD_BYTES, MAX_RECORD_LIFETIME_MS, PROTOCOL_VERSION,
};

/// Domain separation: a signature over a server-info record can never be
/// replayed as a signature over anything else nakshatra (or libp2p) signs.
const SIGNING_DOMAIN: &[u8] = b"nakshatra/server-info\0";

/// Why a record was refused. Receivers drop the record and log this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The encoded record is larger than allowed.
    #[error("record is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Size of what was received, in bytes.
        size: usize,
        /// The largest size accepted, in bytes ([`VerifyLimits::max_bytes`]).
        max: usize,
    },
    /// The bytes do not decode (truncated, garbage, trailing bytes, bad key
    /// encoding).
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The signature does not verify against the embedded public key.
    #[error("signature does not verify")]
    BadSignature,
    /// The record is validly signed, but by another peer than the one it is
    /// stored under or was received from.
    #[error("record signed by {signer}, but it claims to describe {expected}")]
    PeerMismatch {
        /// The peer the record should describe (DHT key, connection).
        expected: Box<PeerId>,
        /// The peer whose key signed it.
        signer: Box<PeerId>,
    },
    /// Another protocol version.
    #[error("protocol version {found}, this node speaks {expected}")]
    WrongVersion {
        /// Version in the record.
        found: u32,
        /// [`PROTOCOL_VERSION`].
        expected: u32,
    },
    /// `expires_at_ms` is not after now.
    #[error("expired at {expires_at_ms} (now {now_ms}, unix ms)")]
    Expired {
        /// The record's `expires_at_ms`, unix time in milliseconds.
        expires_at_ms: u64,
        /// The verifier's clock, unix time in milliseconds.
        now_ms: u64,
    },
    /// `issued_at_ms` lies further in the future than the allowed clock skew.
    #[error("issued at {issued_at_ms}, in the future (now {now_ms}, unix ms)")]
    FromFuture {
        /// The record's `issued_at_ms`, unix time in milliseconds.
        issued_at_ms: u64,
        /// The verifier's clock, unix time in milliseconds.
        now_ms: u64,
    },
    /// The record claims a lifetime longer than allowed (or a non-positive
    /// one).
    #[error("lifetime of {lifetime_ms} ms is not in 1..={max_ms}")]
    TooLong {
        /// `expires_at_ms - issued_at_ms` (0 when negative).
        lifetime_ms: u64,
        /// The longest lifetime accepted, in milliseconds
        /// ([`VerifyLimits::max_lifetime_ms`]).
        max_ms: u64,
    },
    /// The model id is not 64 lowercase hex characters.
    #[error("bad model id {0:?}: expected 64 lowercase hex characters")]
    BadModelId(String),
    /// The layer range is empty or outside the model.
    #[error("bad layer range {start}..{end} of a {n_layers_total}-layer model")]
    BadRange {
        /// First layer of the claimed range (inclusive).
        start: u32,
        /// Range end (exclusive).
        end: u32,
        /// Number of layers the record says the whole model has.
        n_layers_total: u32,
    },
    /// Another field is out of bounds.
    #[error("bad field {field}: {reason}")]
    BadField {
        /// Name of the offending [`ServerInfo`] field, e.g. `"throughput"`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A [`ServerInfo`] signed by the node it describes: the bincode payload,
/// the ed25519 public key and the signature over
/// `"nakshatra/server-info\0" || version (u32 LE) || payload`.
///
/// The node's libp2p [`PeerId`] is derived from `public_key`
/// ([`SignedServerInfo::peer_id`]), which is what binds the record to the
/// peer: a record stored under, or received from, another peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedServerInfo {
    /// Protocol version (first on the wire; equals the payload's).
    pub version: u32,
    /// Signer's ed25519 public key.
    #[serde(with = "crate::bytes")]
    pub public_key: [u8; 32],
    /// ed25519 signature.
    #[serde(with = "crate::bytes")]
    pub signature: [u8; 64],
    /// bincode-encoded [`ServerInfo`].
    pub payload: Vec<u8>,
}

/// A record that passed [`verify`]: who signed it and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedServerInfo {
    /// The peer the record describes (derived from its signing key).
    pub peer_id: PeerId,
    /// What the record says, checked by [`ServerInfo::validate`].
    pub info: ServerInfo,
}

/// Limits [`verify_with`] applies. [`Default`] gives the protocol's
/// constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyLimits {
    /// Largest encoded record, bytes ([`MAX_RECORD_BYTES`]).
    pub max_bytes: usize,
    /// Allowed clock skew for `issued_at_ms`, ms ([`MAX_CLOCK_SKEW_MS`]).
    pub max_clock_skew_ms: u64,
    /// Longest lifetime, ms ([`MAX_RECORD_LIFETIME_MS`]).
    pub max_lifetime_ms: u64,
}

impl Default for VerifyLimits {
    fn default() -> Self {
        VerifyLimits {
            max_bytes: MAX_RECORD_BYTES,
            max_clock_skew_ms: MAX_CLOCK_SKEW_MS,
            max_lifetime_ms: MAX_RECORD_LIFETIME_MS,
        }
    }
}

impl SignedServerInfo {
    /// Signs `payload` as-is under `version`, without any check. For tools
    /// and tests that need to produce records a verifier must refuse; nodes
    /// use [`sign`].
    pub fn sign_raw(key: &SigningKey, version: u32, payload: Vec<u8>) -> Self {
        let signature = key.sign(&signed_message(version, &payload));
        SignedServerInfo {
            version,
            public_key: key.verifying_key().to_bytes(),
            signature: signature.to_bytes(),
            payload,
        }
    }

    /// The wire form (bincode).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a struct of integers and byte strings cannot fail.
        wire::encode(self).unwrap_or_default()
    }

    /// The peer whose key signed this record.
    pub fn peer_id(&self) -> Result<PeerId, RecordError> {
        peer_id_of(&self.public_key)
    }
}

/// Signs `info` with `key` after checking its fields
/// ([`ServerInfo::validate`]) and that the encoded record fits in
/// [`MAX_RECORD_BYTES`]. Timestamps and version are signed as given (no
/// clock is read here): the caller sets `issued_at_ms` / `expires_at_ms`.
pub fn sign(key: &SigningKey, info: &ServerInfo) -> Result<SignedServerInfo, RecordError> {
    info.validate()?;
    if info.expires_at_ms <= info.issued_at_ms {
        return Err(RecordError::TooLong {
            lifetime_ms: 0,
            max_ms: MAX_RECORD_LIFETIME_MS,
        });
    }
    let payload = wire::encode(info)?;
    let signed = SignedServerInfo::sign_raw(key, info.protocol_version, payload);
    let size = signed.to_bytes().len();
    if size > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            size,
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(signed)
}

/// [`verify_with`] under the protocol's default [`VerifyLimits`].
pub fn verify(
    bytes: &[u8],
    expected_peer: Option<&PeerId>,
    now_ms: u64,
) -> Result<VerifiedServerInfo, RecordError> {
    verify_with(bytes, expected_peer, now_ms, &VerifyLimits::default())
}

/// Verifies an encoded [`SignedServerInfo`] received from the network:
/// size, encoding, protocol version, signature, binding to
/// `expected_peer` (when given: the peer named by the DHT key or the peer
/// on the other end of the connection), every field
/// ([`ServerInfo::validate`]), and freshness at `now_ms` (unix ms):
/// `expires_at_ms > now_ms`, `issued_at_ms <= now_ms + skew`, lifetime in
/// `1..=max_lifetime_ms`.
///
/// Returns the signer and the record, or why it must be dropped. Never
/// panics, whatever the bytes.
pub fn verify_with(
    bytes: &[u8],
    expected_peer: Option<&PeerId>,
    now_ms: u64,
    limits: &VerifyLimits,
) -> Result<VerifiedServerInfo, RecordError> {
    if bytes.len() > limits.max_bytes {
        return Err(RecordError::TooLarge {
            size: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let signed: SignedServerInfo = match wire::decode(bytes, limits.max_bytes) {
        Ok(s) => s,
        Err(RecordError::Malformed(why)) => {
            // A record of another version may not even decode; its leading
            // version number is the best hint there is (garbage reads as
            // some number too, so this stays `Malformed`).
            let hint = bincode::serde::decode_from_slice::<u32, _>(
                bytes,
                bincode::config::standard().with_limit::<16>(),
            );
            return Err(match hint {
                Ok((found, _)) if found != PROTOCOL_VERSION => {
                    RecordError::Malformed(format!("{why} (leading version field reads {found})"))
                }
                _ => RecordError::Malformed(why),
            });
        }
        Err(e) => return Err(e),
    };
    if signed.version != PROTOCOL_VERSION {
        return Err(RecordError::WrongVersion {
            found: signed.version,
            expected: PROTOCOL_VERSION,
        });
    }
    let verifying_key = VerifyingKey::from_bytes(&signed.public_key)
        .map_err(|_| RecordError::Malformed("public key is not a valid ed25519 point".into()))?;
    let signer = peer_id_of(&signed.public_key)?;
    if let Some(expected) = expected_peer {
        if *expected != signer {
            return Err(RecordError::PeerMismatch {
                expected: Box::new(*expected),
                signer: Box::new(signer),
            });
        }
    }
    let signature = Signature::from_bytes(&signed.signature);
    verifying_key
        .verify_strict(&signed_message(signed.version, &signed.payload), &signature)
        .map_err(|_| RecordError::BadSignature)?;

    let info: ServerInfo = wire::decode(&signed.payload, limits.max_bytes)?;
    if info.protocol_version != signed.version {
        return Err(RecordError::WrongVersion {
            found: info.protocol_version,
            expected: PROTOCOL_VERSION,
        });
    }
    info.validate()?;

    let lifetime_ms = info.expires_at_ms.saturating_sub(info.issued_at_ms);
    if lifetime_ms == 0 || lifetime_ms > limits.max_lifetime_ms {
        return Err(RecordError::TooLong {
            lifetime_ms,
            max_ms: limits.max_lifetime_ms,
        });
    }
    if info.issued_at_ms > now_ms.saturating_add(limits.max_clock_skew_ms) {
        return Err(RecordError::FromFuture {
            issued_at_ms: info.issued_at_ms,
            now_ms,
        });
    }
    if info.expires_at_ms <= now_ms {
        return Err(RecordError::Expired {
            expires_at_ms: info.expires_at_ms,
            now_ms,
        });
    }
    Ok(VerifiedServerInfo {
        peer_id: signer,
        info,
    })
}

/// The libp2p [`PeerId`] of an ed25519 public key (identity multihash of
/// its protobuf encoding, as `PeerId::from_public_key` computes it).
pub fn peer_id_of(public_key: &[u8; 32]) -> Result<PeerId, RecordError> {
    let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(public_key)
        .map_err(|e| RecordError::Malformed(format!("public key: {e}")))?;
    Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
}

/// The ed25519 key a peer id carries inline (ed25519 peer ids are the
/// identity multihash of the protobuf-encoded public key); `None` for a
/// peer id that hashes its key or holds another key type.
pub fn ed25519_key_of(peer: &PeerId) -> Option<VerifyingKey> {
    // Multihash bytes: code (varint), digest length (varint), digest. An
    // inline key has code 0 (identity) and, being under 128 bytes, a
    // one-byte length.
    let bytes = peer.to_bytes();
    let (&code, rest) = bytes.split_first()?;
    let (&len, digest) = rest.split_first()?;
    if code != 0 || len as usize != digest.len() || len >= 0x80 {
        return None;
    }
    let key = libp2p_identity::PublicKey::try_decode_protobuf(digest).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    VerifyingKey::from_bytes(&ed.to_bytes()).ok()
}

/// The current unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn signed_message(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + 4 + payload.len());
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.extend_from_slice(&version.to_le_bytes());
    msg.extend_from_slice(payload);
    msg
}
