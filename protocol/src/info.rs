//! What a serving node says about itself.

use std::{ops::Range, str::FromStr};

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::{RecordError, MAX_LAYERS, MAX_NEXT_RTTS, PROTOCOL_VERSION};

/// Most devices one record may list.
const MAX_DEVICES: usize = 16;
/// Most listen addresses one record may list.
const MAX_ADDRS: usize = 32;
/// Longest listen address string, in bytes.
const MAX_ADDR_LEN: usize = 256;
/// Longest architecture name, in bytes.
const MAX_ARCH_LEN: usize = 64;
/// Longest device name / backend / description, in bytes.
const MAX_DEVICE_NAME_LEN: usize = 128;
const MAX_BACKEND_LEN: usize = 32;
const MAX_DESCRIPTION_LEN: usize = 256;
/// Most features one device may list.
const MAX_FEATURES: usize = 64;
/// Longest feature name, in bytes.
const MAX_FEATURE_LEN: usize = 32;
/// Largest embedding width a record may claim.
const MAX_N_EMBD: u32 = 1 << 20;
/// Highest decode throughput a record may announce, tokens/s: one
/// llama.cpp decode step through even one layer takes well over 10 µs on
/// any hardware, so more than this is a lie, not a fast machine. (A lie
/// below it is caught by the asker measuring the hop.)
pub const MAX_THROUGHPUT: f64 = 100_000.0;
/// Most context tokens per session a record may announce (far beyond any
/// model's trained context).
pub const MAX_CONTEXT: u32 = 1 << 24;
/// Most sessions a record may announce.
pub const MAX_SESSIONS: u32 = 1 << 16;
/// Longest peer id string in [`NextRtt::peer_id`], bytes (a base58 PeerId
/// of an ed25519 key is 52 characters).
const MAX_PEER_ID_LEN: usize = 128;

/// Lifecycle state of a serving node, as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Starting up (loading weights); announced but not yet taking sessions.
    Joining,
    /// Serving its range and taking sessions; the only state the planner
    /// routes through.
    #[default]
    Online,
    /// Left the swarm (graceful withdraw). Published as a tombstone so that
    /// peers still holding its provider records drop it at once instead of
    /// waiting for the records to expire.
    Offline,
}

/// One compute device of a serving node (as llama.cpp's backend registry
/// reports it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device name, e.g. `CUDA0` or `CPU`.
    pub name: String,
    /// Backend name, e.g. `CUDA`, `Metal`, `Vulkan`, `CPU`.
    pub backend: String,
    /// Human-readable description, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// Total device memory, in bytes.
    pub memory_total: u64,
    /// Free device memory when the record was issued, in bytes.
    pub memory_free: u64,
    /// Features of the device this build uses, as ggml names them (the
    /// CPU's: `AVX2`, `FMA`, `F16C`, `AVX512`, `NEON`, ...; at most 64).
    /// Hosts whose builds use other kernels may compute other bits: what
    /// exactness across peers depends on is in `docs/speed.md`.
    pub features: Vec<String>,
}

/// A round-trip time this node measured to a holder of the block right after
/// its range (a candidate next hop), as Petals servers report `next_pings`.
/// Askers use it as the link cost from this node to that peer when planning
/// a chain.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NextRtt {
    /// The probed peer, base58 (must parse as a PeerId).
    pub peer_id: String,
    /// Best-of-three application-level RTT (`/nakshatra/probe/1`), in
    /// milliseconds; finite and `>= 0`.
    pub rtt_ms: f32,
}

impl NextRtt {
    /// The probed peer, if `peer_id` parses.
    pub fn peer(&self) -> Option<PeerId> {
        PeerId::from_str(&self.peer_id).ok()
    }
}

/// What a serving node announces: which layers of which model it holds and
/// what it can do with them. Carried inside a [`crate::SignedServerInfo`];
/// the node's identity is the signing key, so it is not repeated here.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Wire protocol version ([`PROTOCOL_VERSION`]); kept first so that
    /// a reader can tell a newer record from a malformed one.
    pub protocol_version: u32,
    /// Model id: 64 lowercase hex characters (the slicer's content id).
    pub model_id: String,
    /// Model architecture as GGUF names it (`llama`, `qwen2`, ...).
    pub arch: String,
    /// Number of blocks (layers) of the whole model.
    pub n_layers_total: u32,
    /// First block held (inclusive).
    pub start: u32,
    /// End of the held range (exclusive): the node holds `start..end`.
    pub end: u32,
    /// Width of the hidden states (`n_embd`).
    pub n_embd: u32,
    /// Compute devices the range runs on.
    pub devices: Vec<DeviceInfo>,
    /// Measured throughput through the whole held range, in tokens per
    /// second (finite, `>= 0`).
    pub throughput: f64,
    /// Sessions the node can open right now.
    pub free_sessions: u32,
    /// Sessions the node can hold at most.
    pub max_sessions: u32,
    /// Context length (tokens of KV cache) each session gets.
    pub context_per_session: u32,
    /// Lifecycle state; chains are planned only through `Online` nodes.
    pub state: ServerState,
    /// Addresses the node listens on (multiaddr strings, without `/p2p/`).
    pub listen_addrs: Vec<String>,
    /// When the record was issued, unix time in milliseconds.
    pub issued_at_ms: u64,
    /// When the record stops being valid, unix time in milliseconds.
    pub expires_at_ms: u64,
    /// RTTs this node measured to holders of block `end` (its candidate
    /// next hops); empty for a node holding the last block, or before its
    /// first measurement. At most [`MAX_NEXT_RTTS`] entries.
    pub next_rtts: Vec<NextRtt>,
    /// The model's human name, `base:tag` (`smollm2:135m-q4_1`), from its
    /// `general.*` metadata, which the model id does not cover: a hint for
    /// people and API clients, never an identity (any peer may announce any
    /// name; [`is_valid_model_name`] bounds it). Empty: none.
    pub model_name: String,
}

impl ServerInfo {
    /// A record for `range` of the model `model_id`, with the current
    /// [`PROTOCOL_VERSION`], state [`ServerState::Online`] and every other
    /// field zero or empty (fill them in before announcing).
    pub fn new(
        model_id: impl Into<String>,
        arch: impl Into<String>,
        n_layers_total: u32,
        range: Range<u32>,
        n_embd: u32,
    ) -> Self {
        ServerInfo {
            protocol_version: PROTOCOL_VERSION,
            model_id: model_id.into(),
            arch: arch.into(),
            n_layers_total,
            start: range.start,
            end: range.end,
            n_embd,
            ..ServerInfo::default()
        }
    }

    /// The held block range, `start..end`.
    pub fn range(&self) -> Range<u32> {
        self.start..self.end
    }

    /// Whether the node holds block `block`.
    pub fn holds(&self, block: u32) -> bool {
        self.range().contains(&block)
    }

    /// Backend names of the devices, deduplicated in order and joined with
    /// `+` (e.g. `CUDA+CPU`); `unknown` when no device is listed.
    pub fn backend_summary(&self) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for d in &self.devices {
            if !seen.contains(&d.backend.as_str()) {
                seen.push(&d.backend);
            }
        }
        if seen.is_empty() {
            "unknown".to_string()
        } else {
            seen.join("+")
        }
    }

    /// Checks every field except the version and the timestamps (those are
    /// [`crate::verify`]'s job, which calls this too): model id, range,
    /// sizes, string lengths and characters, throughput. A node runs it
    /// before announcing so that it never publishes what its peers would
    /// drop.
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_model_id(&self.model_id)?;
        check_text("arch", &self.arch, MAX_ARCH_LEN)?;
        if self.arch.is_empty() {
            return Err(bad("arch", "empty"));
        }
        if self.n_layers_total == 0 || self.n_layers_total > MAX_LAYERS {
            return Err(RecordError::BadRange {
                start: self.start,
                end: self.end,
                n_layers_total: self.n_layers_total,
            });
        }
        if self.start >= self.end || self.end > self.n_layers_total {
            return Err(RecordError::BadRange {
                start: self.start,
                end: self.end,
                n_layers_total: self.n_layers_total,
            });
        }
        if self.n_embd == 0 || self.n_embd > MAX_N_EMBD {
            return Err(bad(
                "n_embd",
                format!("{} out of 1..={MAX_N_EMBD}", self.n_embd),
            ));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(bad(
                "devices",
                format!("{} devices, at most {MAX_DEVICES}", self.devices.len()),
            ));
        }
        for d in &self.devices {
            check_text("devices.name", &d.name, MAX_DEVICE_NAME_LEN)?;
            check_text("devices.backend", &d.backend, MAX_BACKEND_LEN)?;
            check_text("devices.description", &d.description, MAX_DESCRIPTION_LEN)?;
            if d.features.len() > MAX_FEATURES {
                return Err(bad(
                    "devices.features",
                    format!("{} features, at most {MAX_FEATURES}", d.features.len()),
                ));
            }
            for f in &d.features {
                check_text("devices.features", f, MAX_FEATURE_LEN)?;
            }
        }
        if !self.throughput.is_finite() || !(0.0..=MAX_THROUGHPUT).contains(&self.throughput) {
            return Err(bad(
                "throughput",
                format!(
                    "{} is not a rate in 0..={MAX_THROUGHPUT} tokens/s",
                    self.throughput
                ),
            ));
        }
        if self.context_per_session > MAX_CONTEXT {
            return Err(bad(
                "context_per_session",
                format!("{} tokens, at most {MAX_CONTEXT}", self.context_per_session),
            ));
        }
        if self.max_sessions > MAX_SESSIONS {
            return Err(bad(
                "max_sessions",
                format!("{}, at most {MAX_SESSIONS}", self.max_sessions),
            ));
        }
        if self.free_sessions > self.max_sessions {
            return Err(bad(
                "free_sessions",
                format!("{} free of {} max", self.free_sessions, self.max_sessions),
            ));
        }
        if self.listen_addrs.len() > MAX_ADDRS {
            return Err(bad(
                "listen_addrs",
                format!("{} addresses, at most {MAX_ADDRS}", self.listen_addrs.len()),
            ));
        }
        for a in &self.listen_addrs {
            check_text("listen_addrs", a, MAX_ADDR_LEN)?;
        }
        if self.next_rtts.len() > MAX_NEXT_RTTS {
            return Err(bad(
                "next_rtts",
                format!("{} entries, at most {MAX_NEXT_RTTS}", self.next_rtts.len()),
            ));
        }
        if !self.model_name.is_empty() && !is_valid_model_name(&self.model_name) {
            return Err(bad(
                "model_name",
                format!(
                    "{:?} is not a model name (at most {MAX_MODEL_NAME_LEN} bytes of \
                     a-z 0-9 . _ -, one `:` between base and tag)",
                    self.model_name.chars().take(80).collect::<String>()
                ),
            ));
        }
        for r in &self.next_rtts {
            if r.peer_id.len() > MAX_PEER_ID_LEN || r.peer().is_none() {
                return Err(bad(
                    "next_rtts.peer_id",
                    format!(
                        "{:?} is not a peer id",
                        r.peer_id.chars().take(80).collect::<String>()
                    ),
                ));
            }
            if !r.rtt_ms.is_finite() || r.rtt_ms < 0.0 {
                return Err(bad(
                    "next_rtts.rtt_ms",
                    format!("{} is not a finite time >= 0", r.rtt_ms),
                ));
            }
        }
        Ok(())
    }
}

/// Longest [`ServerInfo::model_name`], bytes.
pub const MAX_MODEL_NAME_LEN: usize = 128;

/// Whether `name` is a well-formed model name: non-empty, at most
/// [`MAX_MODEL_NAME_LEN`] bytes of ASCII lowercase letters, digits, `.`,
/// `_` and `-`, with at most one `:` (between a non-empty base and a
/// non-empty tag), as `nakshatra_slicer::model_name` writes them.
pub fn is_valid_model_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_MODEL_NAME_LEN {
        return false;
    }
    let part = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    match name.split_once(':') {
        None => part(name),
        Some((base, tag)) => part(base) && part(tag),
    }
}

/// Checks that `id` looks like a model id: exactly 64 lowercase hex
/// characters. Model ids are otherwise opaque here (the slicer computes
/// them); they end up inside DHT keys, so one spelling per model matters.
pub fn validate_model_id(id: &str) -> Result<(), RecordError> {
    let ok = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        let shown: String = id
            .chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string();
        Err(RecordError::BadModelId(shown))
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> RecordError {
    RecordError::BadField {
        field,
        reason: reason.into(),
    }
}

/// Bounded length, no control characters (records end up on terminals).
fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), RecordError> {
    if s.len() > max {
        return Err(bad(field, format!("{} bytes, at most {max}", s.len())));
    }
    if s.chars().any(char::is_control) {
        return Err(bad(field, "contains control characters"));
    }
    Ok(())
}
