//! nakshatra's wire types: what peers say to each other, and how records
//! are signed and verified. Pure data: no sockets, no files, no llama.cpp,
//! no async runtime.
//!
//! What lives here:
//!
//! - [`ServerInfo`] / [`DeviceInfo`]: what a serving node says about itself
//!   (model, layer range, devices, throughput, free sessions, ...).
//! - [`SignedServerInfo`], [`sign`], [`verify`]: the ed25519-signed envelope
//!   around a `ServerInfo`, bound to the signer's libp2p [`PeerId`]. Every
//!   record a node acts on goes through [`verify`] first.
//! - [`keys`]: the Kademlia key layout (`/nakshatra/1/...`).
//! - [`rpc`]: messages of the direct `/nakshatra/info/1` request-response
//!   protocol.
//!
//! - [`act`]: frames of the activation, token-return and vocabulary
//!   protocols (a chain of hops pushing hidden states).
//!
//! # Example
//!
//! ```
//! use nakshatra_protocol::{sign, verify, ServerInfo, PROTOCOL_VERSION};
//!
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
//! let mut info = ServerInfo::new("ab".repeat(32), "llama", 30, 0..6, 2048);
//! info.issued_at_ms = 1_000;
//! info.expires_at_ms = 91_000;
//! let signed = sign(&key, &info).unwrap();
//! let bytes = signed.to_bytes();
//! let peer = signed.peer_id().unwrap();
//! let checked = verify(&bytes, Some(&peer), 2_000).unwrap();
//! assert_eq!(checked.info, info);
//! assert_eq!(checked.peer_id, peer);
//! assert_eq!(checked.info.protocol_version, PROTOCOL_VERSION);
//! ```

#![forbid(unsafe_code)]

pub mod act;
mod bytes;
pub mod fetch;
mod info;
pub mod keys;
mod record;
pub mod rpc;
mod wire;

pub use info::{
    is_valid_model_name, validate_model_id, DeviceInfo, NextRtt, ServerInfo, ServerState,
    MAX_MODEL_NAME_LEN,
};
pub use record::{
    ed25519_key_of, now_ms, peer_id_of, sign, verify, verify_with, RecordError, SignedServerInfo,
    VerifiedServerInfo, VerifyLimits,
};
pub use wire::{decode, encode, DECODE_LIMIT};

/// The libp2p peer identity type records are bound to (re-exported from
/// `libp2p-identity`, the same type `libp2p::PeerId` is).
pub use libp2p_identity::PeerId;

/// Version of the wire protocol; peers refuse records of another version.
/// Version 2 added [`ServerInfo::next_rtts`], version 3
/// [`DeviceInfo::features`], version 4 direct streams (`OpenSession::direct`,
/// `/nakshatra/act/5`, `/nakshatra/direct/1`), version 5 the logits digest
/// in a frame of its own after the token (`/nakshatra/tokens/4`), version 6
/// the ring (`OpenSession::ring`, `StepHeader::ring`, `/nakshatra/act/6`,
/// `/nakshatra/ring/1`), version 7 the model's human name
/// ([`ServerInfo::model_name`]).
pub const PROTOCOL_VERSION: u32 = 7;

/// Most [`NextRtt`] entries one [`ServerInfo`] may carry.
pub const MAX_NEXT_RTTS: usize = 16;

/// Largest encoded [`SignedServerInfo`] a peer accepts, in bytes.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// How far in the future a record's `issued_at_ms` may lie (clock skew
/// between peers), in milliseconds.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// Longest lifetime (`expires_at_ms - issued_at_ms`) a peer accepts for a
/// record, in milliseconds (one hour).
pub const MAX_RECORD_LIFETIME_MS: u64 = 60 * 60 * 1000;

/// Largest number of layers (blocks) a model may announce.
pub const MAX_LAYERS: u32 = 4096;
