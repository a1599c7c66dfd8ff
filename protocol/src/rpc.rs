//! Messages of the direct info protocol, `/nakshatra/info/1`: any peer asks
//! a node for its current signed [`crate::ServerInfo`]; the asker verifies
//! the answer like any DHT record (and binds it to the peer it asked).
//!
//! Also the constants of the RTT probe protocol, `/nakshatra/probe/1` (a raw
//! stream: the prober writes a [`PROBE_NONCE_LEN`]-byte nonce, the other
//! side writes the same bytes back; repeat on the same stream).

use serde::{Deserialize, Serialize};

use crate::{wire, RecordError, MAX_RECORD_BYTES, PROTOCOL_VERSION};

/// libp2p protocol name of the direct info protocol.
pub const INFO_PROTOCOL: &str = "/nakshatra/info/1";

/// libp2p protocol name of the RTT probe protocol (raw stream, nonce echo).
pub const PROBE_PROTOCOL: &str = "/nakshatra/probe/1";

/// Bytes of one probe nonce (and of its echo).
pub const PROBE_NONCE_LEN: usize = 8;

/// Largest encoded [`InfoRequest`], bytes.
pub const MAX_INFO_REQUEST_BYTES: usize = 64;

/// Largest encoded [`InfoResponse`], bytes.
pub const MAX_INFO_RESPONSE_BYTES: usize = MAX_RECORD_BYTES + 64;

/// "Send me your current signed info."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoRequest {
    /// The asker's protocol version.
    pub version: u32,
}

impl Default for InfoRequest {
    fn default() -> Self {
        InfoRequest {
            version: PROTOCOL_VERSION,
        }
    }
}

/// Answer to an [`InfoRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InfoResponse {
    /// The node serves: an encoded [`crate::SignedServerInfo`] (verify it).
    Serving(Vec<u8>),
    /// The node announces nothing (client, not yet announced, or withdrawn).
    NotServing,
}

impl InfoRequest {
    /// The request in the protocol's bincode wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self).unwrap_or_default()
    }

    /// Parses the wire form (at most [`MAX_INFO_REQUEST_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        wire::decode(bytes, MAX_INFO_REQUEST_BYTES)
    }
}

impl InfoResponse {
    /// The response in the protocol's bincode wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self).unwrap_or_default()
    }

    /// Parses the wire form (at most [`MAX_INFO_RESPONSE_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        wire::decode(bytes, MAX_INFO_RESPONSE_BYTES)
    }
}

/// libp2p protocol name of the view protocol: a node asks a peer for the
/// signed infos it holds (a new node's first view of the swarm, and a
/// periodic catch-up next to the gossip topic
/// [`crate::keys::INFOS_TOPIC`]).
pub const VIEW_PROTOCOL: &str = "/nakshatra/view/1";

/// Most infos one [`ViewResponse`] carries, and most entries of a
/// [`ViewRequest`]'s digest.
pub const MAX_VIEW_INFOS: usize = 4096;

/// Largest encoded [`ViewRequest`], bytes (a full digest plus a model id).
pub const MAX_VIEW_REQUEST_BYTES: usize = MAX_VIEW_INFOS * 20 + 256;

/// Largest encoded [`ViewResponse`], bytes: what one answer may cost the
/// asker, whoever sent it (bincode's own decode limit,
/// [`crate::wire::DECODE_LIMIT`]). A responder with more to send sets
/// [`ViewResponse::more`] and the asker asks again with its new digest.
pub const MAX_VIEW_RESPONSE_BYTES: usize = crate::wire::DECODE_LIMIT;

/// "Send me the signed infos you hold that I lack."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewRequest {
    /// The asker's protocol version.
    pub version: u32,
    /// Only infos of this model (`None`: every model).
    pub model: Option<String>,
    /// What the asker holds: ([`digest_peer`] of a peer, that peer's
    /// `issued_at_ms`). The answer leaves out infos not newer than these.
    pub known: Vec<(u64, u64)>,
}

/// Answer to a [`ViewRequest`]: encoded [`crate::SignedServerInfo`]s (the
/// asker verifies each, like any record; one bad entry costs only itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ViewResponse {
    /// Signed infos, at most [`MAX_VIEW_INFOS`].
    pub infos: Vec<Vec<u8>>,
    /// The responder left infos out to stay under
    /// [`MAX_VIEW_RESPONSE_BYTES`]: ask again.
    pub more: bool,
}

/// A peer's 64-bit tag in a [`ViewRequest`] digest: the first 8 bytes of
/// the BLAKE3 hash of its peer id bytes, little-endian. A collision only
/// makes the answer leave out one info the asker then gets from the
/// gossip.
pub fn digest_peer(peer: &libp2p_identity::PeerId) -> u64 {
    let h = blake3::hash(&peer.to_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

impl ViewRequest {
    /// The request in the protocol's bincode wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self).unwrap_or_default()
    }

    /// Parses the wire form (at most [`MAX_VIEW_REQUEST_BYTES`], at most
    /// [`MAX_VIEW_INFOS`] digest entries).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        let r: ViewRequest = wire::decode(bytes, MAX_VIEW_REQUEST_BYTES)?;
        if r.known.len() > MAX_VIEW_INFOS {
            return Err(RecordError::Malformed(format!(
                "view digest of {} entries (at most {MAX_VIEW_INFOS})",
                r.known.len()
            )));
        }
        if r.model.as_ref().is_some_and(|m| m.len() > 64) {
            return Err(RecordError::Malformed("model id over 64 bytes".into()));
        }
        Ok(r)
    }
}

impl ViewResponse {
    /// The response in the protocol's bincode wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self).unwrap_or_default()
    }

    /// Parses the wire form (at most [`MAX_VIEW_RESPONSE_BYTES`], at most
    /// [`MAX_VIEW_INFOS`] infos of at most [`MAX_RECORD_BYTES`] each).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        let r: ViewResponse = wire::decode(bytes, MAX_VIEW_RESPONSE_BYTES)?;
        if r.infos.len() > MAX_VIEW_INFOS {
            return Err(RecordError::Malformed(format!(
                "view of {} infos (at most {MAX_VIEW_INFOS})",
                r.infos.len()
            )));
        }
        if let Some(big) = r.infos.iter().find(|i| i.len() > MAX_RECORD_BYTES) {
            return Err(RecordError::TooLarge {
                size: big.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let req = InfoRequest::default();
        assert_eq!(InfoRequest::from_bytes(&req.to_bytes()), Ok(req));
        for resp in [
            InfoResponse::NotServing,
            InfoResponse::Serving(vec![1, 2, 3]),
        ] {
            assert_eq!(InfoResponse::from_bytes(&resp.to_bytes()), Ok(resp));
        }
        let big = InfoResponse::Serving(vec![0; MAX_INFO_RESPONSE_BYTES]).to_bytes();
        assert!(matches!(
            InfoResponse::from_bytes(&big),
            Err(RecordError::TooLarge { .. })
        ));
        assert!(InfoResponse::from_bytes(&[]).is_err());
        assert!(InfoResponse::from_bytes(&[9, 9, 9]).is_err());
    }
}
