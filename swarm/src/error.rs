//! Errors, one enum per operation.

use libp2p::PeerId;
use nakshatra_protocol::RecordError;

/// Why [`crate::spawn`] failed. A down bootstrap peer is *not* an error
/// (it is retried in the background).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwarmError {
    /// The configuration is inconsistent (see [`crate::SwarmConfig::validate`]).
    #[error("invalid swarm configuration: {0}")]
    Config(String),
    /// The identity is not an ed25519 key (records are signed with
    /// ed25519).
    #[error("the node identity must be an ed25519 key")]
    NotEd25519,
    /// The transport could not be built (e.g. no DNS configuration).
    #[error("cannot build the transport: {0}")]
    Transport(String),
    /// Listening on an address failed (port taken, address not local,
    /// unsupported protocol).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The configured listen address that was refused.
        addr: libp2p::Multiaddr,
        /// The transport's reason, for people.
        reason: String,
    },
}

/// The event loop has stopped (shut down or crashed); the [`crate::Client`]
/// is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the swarm event loop has stopped")]
pub struct Stopped;

/// Why [`crate::Client::announce`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// Client-mode nodes cannot announce.
    #[error("a client-mode node cannot announce")]
    NotServer,
    /// The info is not valid (peers would drop it).
    #[error("invalid server info: {0}")]
    Invalid(#[from] RecordError),
    /// The event loop has stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// Why a DHT lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The model id is malformed.
    #[error(transparent)]
    BadModelId(#[from] RecordError),
    /// The event loop has stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// Why [`crate::Client::server_info`] found no usable info for a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// The peer answered that it serves nothing, or its newest record is a
    /// withdrawal tombstone.
    #[error("peer {0} serves nothing (never announced or withdrew)")]
    NotServing(PeerId),
    /// Neither the peer nor the DHT gave a record that verifies. `last` is
    /// why the last candidate was refused, if there was one.
    #[error("no valid info for peer {peer}{}", last.as_ref().map(|e| format!(" (last refusal: {e})")).unwrap_or_default())]
    NotFound {
        /// The peer whose info was asked for.
        peer: PeerId,
        /// Why the last candidate record was refused; `None` when no
        /// record was found at all.
        last: Option<RecordError>,
    },
    /// The event loop has stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}
