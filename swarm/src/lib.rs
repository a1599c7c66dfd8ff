//! nakshatra's libp2p layer: identity, transports, Kademlia records, mDNS,
//! the stream protocols and chain planning. Knows bytes and peers, never
//! llama.cpp.
//!
//! Filled by the swarm work; for now it only re-exports the protocol
//! version it speaks.

#![warn(missing_docs)]

pub use nakshatra_protocol::PROTOCOL_VERSION;
