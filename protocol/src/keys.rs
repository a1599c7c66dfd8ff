//! The Kademlia key layout. Every key starts with [`PREFIX`]; a node
//! refuses records and provider records under any other key.
//!
//! | key | kind | who |
//! |---|---|---|
//! | `/nakshatra/1/model/{model_id}` | provider | every node serving `model_id` |
//! | `/nakshatra/1/info/{peer_id}` | record | the node's signed `ServerInfo` |
//! | `/nakshatra/1/models` | provider | nobody since the info gossip (still parsed: a fallback directory) |
//! | `/nakshatra/1/block/{model_id}/{block}` | provider | nobody since the info gossip (still parsed, and bounded like any key) |
//!
//! Ranges and capacity travel in the signed info, on the gossip topic
//! [`INFOS_TOPIC`] and the view protocol (`crate::rpc::VIEW_PROTOCOL`):
//! per-block keys cost one DHT walk per held block per refresh and gave
//! incomplete holder lists at a few hundred nodes (`docs/scale.md`).

use std::str::FromStr;

use libp2p_identity::PeerId;

use crate::{validate_model_id, MAX_LAYERS};

/// Common prefix of every nakshatra DHT key (the `1` is the key layout
/// version).
pub const PREFIX: &str = "/nakshatra/1";

/// Gossipsub topic on which every serving node publishes its signed info
/// (the same bytes as its info record) at each refresh and on each
/// change; every node keeps the newest verified info per peer from it.
pub const INFOS_TOPIC: &str = "/nakshatra/1/infos";

/// Provider key every serving node provides, so that a client can
/// enumerate serving nodes without any static configuration.
pub const MODELS_KEY: &str = "/nakshatra/1/models";

/// Provider key of the nodes serving (any blocks of) `model_id`.
pub fn model_key(model_id: &str) -> String {
    format!("{PREFIX}/model/{model_id}")
}

/// Provider key of the nodes holding block `block` of `model_id`.
pub fn block_key(model_id: &str, block: u32) -> String {
    format!("{PREFIX}/block/{model_id}/{block}")
}

/// Record key of `peer`'s signed `ServerInfo`.
pub fn info_key(peer: &PeerId) -> String {
    format!("{PREFIX}/info/{peer}")
}

/// A parsed nakshatra DHT key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DhtKey {
    /// [`MODELS_KEY`].
    Models,
    /// [`model_key`].
    Model {
        /// Model id named by the key (64 lowercase hex).
        model_id: String,
    },
    /// [`block_key`].
    Block {
        /// Model id named by the key (64 lowercase hex).
        model_id: String,
        /// Index of the block (transformer layer) in the whole model,
        /// from 0.
        block: u32,
    },
    /// [`info_key`].
    Info(PeerId),
}

impl DhtKey {
    /// Parses a raw DHT key; `None` for anything that is not a well-formed
    /// nakshatra key (wrong prefix, bad model id, block beyond
    /// [`MAX_LAYERS`], bad peer id, non-UTF-8).
    pub fn parse(raw: &[u8]) -> Option<DhtKey> {
        let s = std::str::from_utf8(raw).ok()?;
        if s == MODELS_KEY {
            return Some(DhtKey::Models);
        }
        let rest = s.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let kind = parts.next()?;
        let key = match kind {
            "model" => {
                let id = parts.next()?;
                validate_model_id(id).ok()?;
                DhtKey::Model {
                    model_id: id.to_string(),
                }
            }
            "block" => {
                let id = parts.next()?;
                validate_model_id(id).ok()?;
                let block_str = parts.next()?;
                // Canonical decimal only: no sign, no leading zeros.
                if block_str.is_empty()
                    || !block_str.bytes().all(|b| b.is_ascii_digit())
                    || (block_str.len() > 1 && block_str.starts_with('0'))
                {
                    return None;
                }
                let block: u32 = block_str.parse().ok()?;
                if block >= MAX_LAYERS {
                    return None;
                }
                DhtKey::Block {
                    model_id: id.to_string(),
                    block,
                }
            }
            "info" => DhtKey::Info(PeerId::from_str(parts.next()?).ok()?),
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(key)
    }

    /// The key as a string (what [`DhtKey::parse`] reads back).
    pub fn to_key_string(&self) -> String {
        match self {
            DhtKey::Models => MODELS_KEY.to_string(),
            DhtKey::Model { model_id } => model_key(model_id),
            DhtKey::Block { model_id, block } => block_key(model_id, *block),
            DhtKey::Info(peer) => info_key(peer),
        }
    }

    /// Whether this is a provider key (as opposed to a record key).
    pub fn is_provider_key(&self) -> bool {
        !matches!(self, DhtKey::Info(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = "0f".repeat(32);
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let peer = crate::peer_id_of(&key.verifying_key().to_bytes()).unwrap();
        for k in [
            DhtKey::Models,
            DhtKey::Model {
                model_id: id.clone(),
            },
            DhtKey::Block {
                model_id: id.clone(),
                block: 17,
            },
            DhtKey::Info(peer),
        ] {
            assert_eq!(DhtKey::parse(k.to_key_string().as_bytes()), Some(k));
        }
    }

    #[test]
    fn refuses_junk() {
        let id = "0f".repeat(32);
        for bad in [
            String::new(),
            "/nakshatra/1".into(),
            "/nakshatra/2/models".into(),
            "/nakshatra/1/models/x".into(),
            format!("/nakshatra/1/block/{id}"),
            format!("/nakshatra/1/block/{id}/01"),
            format!("/nakshatra/1/block/{id}/-1"),
            format!("/nakshatra/1/block/{id}/4096"),
            format!("/nakshatra/1/block/{id}/1/2"),
            format!("/nakshatra/1/block/{}/1", "0F".repeat(32)),
            "/nakshatra/1/model/abc".into(),
            "/nakshatra/1/info/notapeer".into(),
            "/nakshatra/1/other/x".into(),
        ] {
            assert_eq!(DhtKey::parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(DhtKey::parse(&[0xff, 0xfe]), None);
    }
}
