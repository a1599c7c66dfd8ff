//! What `swarm status` shows: per model, which peers hold which blocks.
//!
//! The JSON shape (checked by outside tools; keep the keys):
//!
//! ```json
//! {"models":[{"id":"<64 hex>","arch":"llama","n_layers":30,
//!   "coverage":[["<peer id>", ...], ...],
//!   "peers":[{"peer_id":"<peer id>","range":[0,6],"backend":"CPU","throughput":12.5,"rtt_ms":0.3,"via":"direct", ...,
//!             "next_rtts":[{"peer_id":"<peer id>","rtt_ms":0.4}]}],
//!   "gaps":[[12,18]]}]}
//! ```
//!
//! `coverage[b]` lists the peers holding block `b`; `range` and `gaps` are
//! half-open `[start, end)` block ranges.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use libp2p::PeerId;
use nakshatra_protocol::{DeviceInfo, NextRtt, ServerInfo, ServerState};
use serde::{Deserialize, Serialize};

/// Every model announced in the swarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SwarmView {
    /// One entry per model id, sorted by id.
    pub models: Vec<ModelView>,
}

/// One model: its blocks, who holds them, and what is missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelView {
    /// Model id (64 hex).
    pub id: String,
    /// Architecture: from the verified manifest when the caller knew it
    /// ([`build_model_view_with`]), else as the majority of its servers
    /// announce it.
    pub arch: String,
    /// Number of blocks of the model: from the verified manifest when the
    /// caller knew it, else the majority of its servers' announcements (0
    /// when no server announced it).
    pub n_layers: u32,
    /// The model's human name (`smollm2:135m-q4_1`) as most of its servers
    /// announce it (ties: the first in byte order); empty when none does.
    /// A hint, not an identity: any peer may announce any name (see
    /// [`ServerInfo::model_name`]).
    #[serde(default)]
    pub name: String,
    /// `coverage[b]`: peers holding block `b` (online, verified), sorted.
    pub coverage: Vec<Vec<PeerId>>,
    /// Serving peers of this model, sorted by range start then peer id.
    pub peers: Vec<PeerView>,
    /// Maximal runs of blocks nobody holds, as half-open `[start, end)`.
    pub gaps: Vec<[u32; 2]>,
}

/// How this node reaches a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Over at least one direct (not relayed) connection.
    Direct,
    /// Only through a circuit relay (`/p2p-circuit`).
    Relay,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Direct => "direct",
            Via::Relay => "relay",
        })
    }
}

/// One serving peer as the view shows it (from its verified, signed info
/// plus the locally measured RTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// The serving peer, whose key signed the info shown.
    pub peer_id: PeerId,
    /// Held blocks, half-open `[start, end)`.
    pub range: [u32; 2],
    /// Backends of its devices (`CUDA`, `CPU+Metal`, ...).
    pub backend: String,
    /// Announced throughput through its range, tokens per second.
    pub throughput: f64,
    /// Round-trip time measured from this node, milliseconds (`null` when
    /// no ping came back in time).
    pub rtt_ms: Option<f64>,
    /// How this node reaches the peer (`"direct"` or `"relay"`; `null`
    /// when not connected to it). Filled in by [`crate::Client::swarm_view`].
    #[serde(default)]
    pub via: Option<Via>,
    /// Announced state (`online` or `joining`).
    pub state: ServerState,
    /// Sessions it can open now.
    pub free_sessions: u32,
    /// Sessions it can hold at most.
    pub max_sessions: u32,
    /// Context tokens (KV cache) each session gets.
    pub context_per_session: u32,
    /// Hidden-state width (floats per token between hops).
    pub n_embd: u32,
    /// The compute devices it announced (name, backend, memory).
    pub devices: Vec<DeviceInfo>,
    /// Addresses it announced.
    pub listen_addrs: Vec<String>,
    /// When its info was issued (unix ms).
    pub issued_at_ms: u64,
    /// When its info expires (unix ms).
    pub expires_at_ms: u64,
    /// RTTs it measured to holders of the block after its range (its
    /// candidate next hops), as it announced them.
    #[serde(default)]
    pub next_rtts: Vec<NextRtt>,
}

impl ModelView {
    /// Whether every block has at least one holder.
    pub fn is_fully_covered(&self) -> bool {
        self.n_layers > 0 && self.gaps.is_empty()
    }

    /// `id (name)`, or the id alone when the model has no name: how an
    /// error lists the models a name could mean.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.id.clone()
        } else {
            format!("{} ({})", self.id, self.name)
        }
    }
}

/// Why [`SwarmView::resolve`] found no one model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing is announced, and no model was named.
    #[error("no model is announced in this swarm")]
    NoModel,
    /// No model was named, and the swarm serves several.
    #[error("the swarm serves several models; name one (`--model`, or a request's `model`): {}", .0.join(", "))]
    NoneNamed(Vec<String>),
    /// The name fits several models, all as covered as each other.
    #[error("`{name}` names several models; give the id: {}", .candidates.join(", "))]
    Ambiguous {
        /// The name as given.
        name: String,
        /// `id (name)` of each model it fits.
        candidates: Vec<String>,
    },
    /// Nothing in the view answers to the name.
    #[error("the model `{0}` is not served in this swarm")]
    Unknown(String),
}

/// Shortest id prefix [`SwarmView::resolve`] takes.
pub const MIN_ID_PREFIX: usize = 8;

/// `name` as a model id if it is a whole one (64 hex digits, any case,
/// surrounding blanks ignored), lowercased; `None` for anything else (a
/// name, a prefix). A whole id names its model without any view.
pub fn whole_model_id(name: &str) -> Option<String> {
    let name = name.trim();
    (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

impl SwarmView {
    /// The id of the model `name`d; `None`: the swarm's only model.
    ///
    /// A name is, in this order: a whole id (64 hex, any case; one not in
    /// the view yet is taken as it is, for the planner to look up); a
    /// model's name as its servers announce it (`smollm2:135m-q4_1`, any
    /// case), its base alone (`smollm2`, also `smollm2:latest`) or the
    /// name cut at a `-` of its tag (`smollm2:135m`); a
    /// prefix of an id of [`MIN_ID_PREFIX`] characters or more. Where a
    /// name fits several models, the fully covered ones are preferred (an
    /// announcement of a few blocks under a known name does not take the
    /// name over); if that still leaves several, it is
    /// [`ResolveError::Ambiguous`]. Names are announced, not verified: the
    /// id is the only way to pin a model.
    pub fn resolve(&self, name: Option<&str>) -> Result<String, ResolveError> {
        let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
            return match self.models.as_slice() {
                [] => Err(ResolveError::NoModel),
                [one] => Ok(one.id.clone()),
                many => Err(ResolveError::NoneNamed(
                    many.iter().map(ModelView::label).collect(),
                )),
            };
        };
        if let Some(id) = whole_model_id(name) {
            return Ok(id);
        }
        let name = name.to_ascii_lowercase();
        let is_hex = name.bytes().all(|b| b.is_ascii_hexdigit());
        let base = name.strip_suffix(":latest").unwrap_or(&name);
        let by_name: Vec<&ModelView> = self
            .models
            .iter()
            .filter(|m| !m.name.is_empty())
            .filter(|m| {
                m.name == name
                    || if base.contains(':') {
                        // A tag cut at a `-`: `smollm2:135m` for
                        // `smollm2:135m-instruct-q4_1`.
                        m.name
                            .strip_prefix(base)
                            .is_some_and(|rest| rest.starts_with('-'))
                    } else {
                        m.name.split(':').next() == Some(base)
                    }
            })
            .collect();
        // An exact name beats a base that several names share.
        let exact: Vec<&ModelView> = by_name.iter().copied().filter(|m| m.name == name).collect();
        let found = if exact.is_empty() { by_name } else { exact };
        let found = if found.is_empty() && name.len() >= MIN_ID_PREFIX && is_hex {
            self.models
                .iter()
                .filter(|m| m.id.starts_with(&name))
                .collect()
        } else {
            found
        };
        let covered: Vec<&ModelView> = found
            .iter()
            .copied()
            .filter(|m| m.is_fully_covered())
            .collect();
        let found = if covered.is_empty() { found } else { covered };
        match found.as_slice() {
            [] => Err(ResolveError::Unknown(name)),
            [one] => Ok(one.id.clone()),
            many => Err(ResolveError::Ambiguous {
                candidates: many.iter().map(|m| m.label()).collect(),
                name,
            }),
        }
    }
}

/// What a model's verified manifest says about its shape: the layer count
/// and architecture every honest announcement of the model repeats. The
/// model id is a content hash and the manifest is checked against it, so
/// this is the truth; announcements are only claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelShape {
    /// Number of blocks (layers) of the whole model.
    pub n_layers: u32,
    /// `general.architecture`.
    pub arch: String,
}

/// Builds the view of `model_id` from verified infos (any model; others are
/// ignored) and measured RTTs, without knowing the model's shape: the
/// layer count and architecture are taken by majority vote of the
/// announcers (ties go to the larger layer count), and peers that
/// disagree are left out.
///
/// A vote can be won by Sybils (any number of identities announcing a
/// wrong layer count), so this is only the fallback for display (`swarm
/// status`, which knows no manifest). Anything that acts on the view
/// (planning a chain, choosing a range to serve) knows the shape from the
/// verified manifest and uses [`build_model_view_with`].
pub fn build_model_view(
    model_id: &str,
    infos: &[(PeerId, ServerInfo)],
    rtts: &HashMap<PeerId, Duration>,
) -> ModelView {
    build_model_view_with(model_id, None, infos, rtts)
}

/// Builds the view of `model_id` from verified infos (any model; others are
/// ignored) and measured RTTs. Offline peers are left out; `joining` peers
/// are listed but do not count as coverage.
///
/// `shape`: the model's shape from its verified manifest. Peers whose
/// `n_layers_total` or `arch` disagree with it are left out, however many
/// they are (one model id is one content hash, so they are lying or
/// broken), and the view has `shape.n_layers` blocks even when nobody
/// serves them. `None`: the majority vote of [`build_model_view`].
pub fn build_model_view_with(
    model_id: &str,
    shape: Option<&ModelShape>,
    infos: &[(PeerId, ServerInfo)],
    rtts: &HashMap<PeerId, Duration>,
) -> ModelView {
    let mine: Vec<&(PeerId, ServerInfo)> = infos
        .iter()
        .filter(|(_, i)| i.model_id == model_id && i.state != ServerState::Offline)
        .collect();

    let (n_layers, arch, what) = match shape {
        Some(s) => (s.n_layers, s.arch.as_str(), "the verified manifest"),
        None => {
            // Majority vote on (n_layers, arch); ties go to the larger
            // layer count.
            let mut votes: BTreeMap<(u32, &str), usize> = BTreeMap::new();
            for (_, i) in &mine {
                *votes
                    .entry((i.n_layers_total, i.arch.as_str()))
                    .or_default() += 1;
            }
            let Some(((n, a), _)) = votes
                .iter()
                .max_by_key(|((n, _), count)| (**count, *n))
                .map(|(k, v)| (*k, *v))
            else {
                return ModelView {
                    id: model_id.to_string(),
                    ..ModelView::default()
                };
            };
            (n, a, "the majority")
        }
    };
    for (peer, i) in &mine {
        if i.n_layers_total != n_layers || i.arch != arch {
            tracing::warn!(
                %peer,
                model = model_id,
                n_layers = i.n_layers_total,
                arch = %i.arch,
                "peer disagrees with {what} about the model's shape ({n_layers} layers, {arch}); ignoring it"
            );
        }
    }
    let mut peers: Vec<PeerView> = mine
        .iter()
        .filter(|(_, i)| i.n_layers_total == n_layers && i.arch == arch)
        .map(|(peer, i)| PeerView {
            peer_id: *peer,
            range: [i.start, i.end],
            backend: i.backend_summary(),
            throughput: i.throughput,
            rtt_ms: rtts.get(peer).map(|d| d.as_secs_f64() * 1000.0),
            via: None,
            state: i.state,
            free_sessions: i.free_sessions,
            max_sessions: i.max_sessions,
            context_per_session: i.context_per_session,
            n_embd: i.n_embd,
            devices: i.devices.clone(),
            listen_addrs: i.listen_addrs.clone(),
            issued_at_ms: i.issued_at_ms,
            expires_at_ms: i.expires_at_ms,
            next_rtts: i.next_rtts.clone(),
        })
        .collect();
    peers.sort_by(|a, b| {
        (a.range[0], a.peer_id.to_base58()).cmp(&(b.range[0], b.peer_id.to_base58()))
    });

    let mut coverage: Vec<Vec<PeerId>> = vec![Vec::new(); n_layers as usize];
    for p in peers.iter().filter(|p| p.state == ServerState::Online) {
        for b in p.range[0]..p.range[1].min(n_layers) {
            coverage[b as usize].push(p.peer_id);
        }
    }
    for holders in &mut coverage {
        holders.sort_by_key(|p| p.to_base58());
        holders.dedup();
    }
    ModelView {
        id: model_id.to_string(),
        arch: arch.to_string(),
        n_layers,
        name: majority_name(
            mine.iter()
                .filter(|(_, i)| i.n_layers_total == n_layers && i.arch == arch)
                .map(|(_, i)| i.model_name.as_str()),
        ),
        gaps: gaps(&coverage),
        coverage,
        peers,
    }
}

/// The name most of `names` say (empty ones left out; ties: the first in
/// byte order); empty when none is given.
fn majority_name<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names.filter(|n| !n.is_empty()) {
        *votes.entry(n).or_default() += 1;
    }
    // `max_by_key` keeps the last of equal keys: reversed, the first.
    votes
        .iter()
        .rev()
        .max_by_key(|(_, count)| **count)
        .map(|(n, _)| n.to_string())
        .unwrap_or_default()
}

/// Maximal runs of empty entries, half-open.
fn gaps(coverage: &[Vec<PeerId>]) -> Vec<[u32; 2]> {
    let mut out = Vec::new();
    let mut start: Option<u32> = None;
    for (b, holders) in coverage.iter().enumerate() {
        let b = b as u32;
        match (holders.is_empty(), start) {
            (true, None) => start = Some(b),
            (false, Some(s)) => {
                out.push([s, b]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push([s, coverage.len() as u32]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(seed: u8) -> PeerId {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        nakshatra_protocol::peer_id_of(&sk.verifying_key().to_bytes()).unwrap()
    }

    fn info(model: &str, n: u32, a: u32, b: u32) -> ServerInfo {
        ServerInfo::new(model, "llama", n, a..b, 64)
    }

    #[test]
    fn coverage_and_gaps() {
        let m = "ab".repeat(32);
        let other = "cd".repeat(32);
        let (p1, p2, p3, p4) = (peer(1), peer(2), peer(3), peer(4));
        let mut offline = info(&m, 10, 8, 10);
        offline.state = ServerState::Offline;
        let infos = vec![
            (p1, info(&m, 10, 0, 3)),
            (p2, info(&m, 10, 2, 5)),
            (p3, offline),
            (p4, info(&other, 10, 5, 8)),
        ];
        let rtts = HashMap::from([(p1, Duration::from_micros(1500))]);
        let v = build_model_view(&m, &infos, &rtts);
        assert_eq!(v.n_layers, 10);
        assert_eq!(v.arch, "llama");
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.peers[0].peer_id, p1);
        assert_eq!(v.peers[0].rtt_ms, Some(1.5));
        assert_eq!(v.peers[1].rtt_ms, None);
        assert_eq!(v.coverage[2].len(), 2);
        assert_eq!(v.coverage[0], vec![p1]);
        assert!(v.coverage[9].is_empty());
        assert_eq!(v.gaps, vec![[5, 10]]);
        assert!(!v.is_fully_covered());

        let json = serde_json::to_value(SwarmView { models: vec![v] }).unwrap();
        let m0 = &json["models"][0];
        for k in ["id", "arch", "n_layers", "coverage", "peers", "gaps"] {
            assert!(m0.get(k).is_some(), "{k}");
        }
        let p0 = &m0["peers"][0];
        for k in ["peer_id", "range", "backend", "throughput", "rtt_ms"] {
            assert!(p0.get(k).is_some(), "{k}");
        }
        assert_eq!(p0["peer_id"], serde_json::json!(p1.to_base58()));
        assert_eq!(p0["range"], serde_json::json!([0, 3]));
        assert_eq!(m0["coverage"][0], serde_json::json!([p1.to_base58()]));
        assert_eq!(m0["gaps"], serde_json::json!([[5, 10]]));
    }

    #[test]
    fn the_name_is_what_most_servers_announce() {
        let m = "ab".repeat(32);
        let named = |a, b, name: &str| {
            let mut i = info(&m, 10, a, b);
            i.model_name = name.into();
            i
        };
        let mut infos = vec![
            (peer(1), named(0, 5, "smollm2:135m-q4_1")),
            (peer(2), named(5, 10, "smollm2:135m-q4_1")),
            (peer(3), named(0, 10, "liar:1t")),
            (peer(4), named(0, 10, "")),
        ];
        let v = build_model_view(&m, &infos, &HashMap::new());
        assert_eq!(v.name, "smollm2:135m-q4_1");
        // A tie goes to the first in byte order, whoever announced first.
        infos[1].1.model_name = "zz".into();
        infos[3].1.model_name = "zz".into();
        assert_eq!(build_model_view(&m, &infos, &HashMap::new()).name, "zz");
        infos[3].1.model_name = String::new();
        assert_eq!(
            build_model_view(&m, &infos, &HashMap::new()).name,
            "liar:1t"
        );
        // Nobody names it.
        for (_, i) in &mut infos {
            i.model_name = String::new();
        }
        assert_eq!(build_model_view(&m, &infos, &HashMap::new()).name, "");
    }

    #[test]
    fn models_are_named_by_id_name_base_or_id_prefix() {
        let model = |id: String, name: &str, covered: bool| ModelView {
            id,
            name: name.into(),
            n_layers: 2,
            gaps: if covered { vec![] } else { vec![[1, 2]] },
            ..ModelView::default()
        };
        let a = format!("abcdef01{}", "0".repeat(56));
        let b = format!("abcdef02{}", "1".repeat(56));
        let c = format!("0123abcd{}", "2".repeat(56));
        let v = SwarmView {
            models: vec![
                model(a.clone(), "smollm2:135m-q4_1", true),
                model(b.clone(), "smollm2:135m-q8_0", true),
                model(c.clone(), "gemma-3:270m-q4_k_m", true),
            ],
        };
        let r = |n: &str| v.resolve(Some(n));
        assert_eq!(r(&a), Ok(a.clone()));
        assert_eq!(r(&b.to_uppercase()), Ok(b.clone()));
        assert_eq!(r("SmolLM2:135M-Q8_0"), Ok(b.clone()));
        assert_eq!(r("gemma-3"), Ok(c.clone()));
        assert_eq!(r("gemma-3:latest"), Ok(c.clone()));
        // The tag cut at a `-`: both smollm2 models have `135m`, only one
        // `135m-q8`; a cut inside a part names nothing.
        assert!(matches!(
            r("smollm2:135m"),
            Err(ResolveError::Ambiguous { .. })
        ));
        assert_eq!(r("smollm2:135m-q8_0"), Ok(b.clone()));
        assert_eq!(r("gemma-3:270m"), Ok(c.clone()));
        assert!(matches!(r("gemma-3:270"), Err(ResolveError::Unknown(_))));
        assert_eq!(r("abcdef02"), Ok(b.clone()));
        // A whole id nobody announces yet goes to the planner.
        assert_eq!(r(&"e".repeat(64)), Ok("e".repeat(64)));
        // Two models share the base.
        let Err(ResolveError::Ambiguous { candidates, .. }) = r("smollm2") else {
            panic!("{:?}", r("smollm2"));
        };
        assert_eq!(
            candidates,
            vec![
                format!("{a} (smollm2:135m-q4_1)"),
                format!("{b} (smollm2:135m-q8_0)")
            ]
        );
        assert!(matches!(r("abcdef0"), Err(ResolveError::Unknown(_))));
        assert!(matches!(r("abcdef"), Err(ResolveError::Unknown(_))));
        assert!(matches!(r("llama"), Err(ResolveError::Unknown(_))));
        assert!(matches!(r("135m-q4_1"), Err(ResolveError::Unknown(_))));
        assert!(matches!(
            v.resolve(None),
            Err(ResolveError::NoneNamed(l)) if l.len() == 3
        ));
        assert!(matches!(
            SwarmView::default().resolve(Some("  ")),
            Err(ResolveError::NoModel)
        ));

        // Someone announces a few blocks of another model under the
        // covered model's name: the name stays with the covered one.
        let squat = format!("feed0000{}", "3".repeat(56));
        let mut w = v.clone();
        w.models
            .push(model(squat.clone(), "gemma-3:270m-q4_k_m", false));
        assert_eq!(w.resolve(Some("gemma-3:270m-q4_k_m")), Ok(c.clone()));
        // Both covered: nobody can tell, and the error says which ids.
        w.models[3].gaps.clear();
        let e = w.resolve(Some("gemma-3")).unwrap_err();
        assert!(
            e.to_string().contains(&squat) && e.to_string().contains(&c),
            "{e}"
        );
        // Only one model: no name needed.
        let one = SwarmView {
            models: vec![v.models[2].clone()],
        };
        assert_eq!(one.resolve(None), Ok(c.clone()));
    }

    #[test]
    fn liars_about_shape_are_outvoted() {
        let m = "ab".repeat(32);
        let infos = vec![
            (peer(1), info(&m, 10, 0, 5)),
            (peer(2), info(&m, 10, 5, 10)),
            (peer(3), info(&m, 12, 0, 12)),
        ];
        let v = build_model_view(&m, &infos, &HashMap::new());
        assert_eq!(v.n_layers, 10);
        assert_eq!(v.peers.len(), 2);
        assert!(v.is_fully_covered());
        assert!(v.gaps.is_empty());
    }

    /// Sybils announcing a 10-layer model outnumber the honest servers of
    /// the 30-layer one: the vote believes them, the verified shape does
    /// not, and the chain planned on it is the honest one.
    #[test]
    fn a_known_shape_beats_a_lying_majority() {
        use crate::plan::{plan_chain, PlanOptions};
        let m = "ab".repeat(32);
        let online = |mut i: ServerInfo| {
            i.throughput = 10.0;
            i.free_sessions = 1;
            i.max_sessions = 1;
            i.context_per_session = 512;
            i
        };
        let mut infos = vec![
            (peer(1), online(info(&m, 30, 0, 15))),
            (peer(2), online(info(&m, 30, 15, 30))),
        ];
        // Five liars: "the model has 10 layers, and I hold them all", each
        // faster than the honest servers.
        for s in 10..15 {
            let mut lie = online(info(&m, 10, 0, 10));
            lie.throughput = 1e6;
            infos.push((peer(s), lie));
        }
        let voted = build_model_view(&m, &infos, &HashMap::new());
        assert_eq!(voted.n_layers, 10, "the vote is what Sybils decide");
        assert_eq!(voted.peers.len(), 5);

        let shape = ModelShape {
            n_layers: 30,
            arch: "llama".into(),
        };
        let v = build_model_view_with(&m, Some(&shape), &infos, &HashMap::new());
        assert_eq!(v.n_layers, 30);
        assert_eq!(v.arch, "llama");
        let kept: Vec<PeerId> = v.peers.iter().map(|p| p.peer_id).collect();
        assert_eq!(kept, vec![peer(1), peer(2)]);
        assert!(v.is_fully_covered());
        let chain = plan_chain(&v, &HashMap::new(), &PlanOptions::default()).unwrap();
        let hops: Vec<(PeerId, u32, u32)> = chain
            .hops
            .iter()
            .map(|h| (h.peer_id, h.start, h.end))
            .collect();
        assert_eq!(hops, vec![(peer(1), 0, 15), (peer(2), 15, 30)]);

        // The architecture is part of the shape too.
        let other = ModelShape {
            n_layers: 30,
            arch: "qwen2".into(),
        };
        let v = build_model_view_with(&m, Some(&other), &infos, &HashMap::new());
        assert!(v.peers.is_empty());
        assert_eq!(v.gaps, vec![[0, 30]]);

        // Known shape, nobody serving: every block is a gap.
        let v = build_model_view_with(&m, Some(&shape), &[], &HashMap::new());
        assert_eq!((v.n_layers, v.gaps.clone()), (30, vec![[0, 30]]));
        assert!(plan_chain(&v, &HashMap::new(), &PlanOptions::default()).is_err());
    }

    #[test]
    fn empty() {
        let v = build_model_view(&"ab".repeat(32), &[], &HashMap::new());
        assert_eq!(v.n_layers, 0);
        assert!(v.coverage.is_empty() && v.gaps.is_empty() && !v.is_fully_covered());
        assert_eq!(gaps(&[vec![], vec![peer(1)], vec![]]), vec![[0, 1], [2, 3]]);
    }
}
