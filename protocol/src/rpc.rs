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
