//! The info cache: the newest verified signed info of every serving peer
//! this node has heard of, from the gossip topic
//! ([`nakshatra_protocol::keys::INFOS_TOPIC`]), view answers
//! (`/nakshatra/view/1`), direct info requests and the node's own
//! announcements. Views and plans are built from it, so a plan costs no
//! DHT walk; an entry leaves at its signed expiry, so a crashed node drops
//! out within one record TTL of its last refresh.
//!
//! Only verified infos enter (the caller verifies). Bounded: at most
//! [`MAX_CACHED_INFOS`] peers and [`MAX_CACHED_BYTES`] bytes; when full, a
//! newcomer replaces the entry that expires first, if it expires later.
//! Withdrawal tombstones (`Offline`) are kept until they expire, so an
//! older `Online` info arriving late cannot bring the peer back.

use std::collections::HashMap;

use libp2p::PeerId;
use nakshatra_protocol::{rpc::digest_peer, ServerInfo, ServerState};

/// Most peers the cache holds (a Sybil flood costs this much, no more).
pub const MAX_CACHED_INFOS: usize = 8192;
/// Most bytes of signed infos the cache holds.
pub const MAX_CACHED_BYTES: usize = 32 * 1024 * 1024;

/// What [`InfoCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// A peer the cache did not hold.
    New,
    /// A newer info of a peer it held.
    Newer,
    /// Not newer than what it holds (or the cache is full of entries that
    /// outlive it): ignored.
    Stale,
}

#[derive(Debug, Clone)]
struct Entry {
    info: ServerInfo,
    signed: Vec<u8>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct InfoCache {
    entries: HashMap<PeerId, Entry>,
    bytes: usize,
}

impl InfoCache {
    /// Keeps `info` (verified, signed by `peer`, encoded as `signed`) if it
    /// is newer than what the cache holds for `peer`.
    pub(crate) fn insert(&mut self, peer: PeerId, info: ServerInfo, signed: Vec<u8>) -> Inserted {
        if let Some(e) = self.entries.get_mut(&peer) {
            if info.issued_at_ms <= e.info.issued_at_ms {
                return Inserted::Stale;
            }
            self.bytes = self.bytes - e.signed.len() + signed.len();
            *e = Entry { info, signed };
            return Inserted::Newer;
        }
        if self.entries.len() >= MAX_CACHED_INFOS || self.bytes + signed.len() > MAX_CACHED_BYTES {
            let Some((&victim, v)) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.info.expires_at_ms)
            else {
                return Inserted::Stale;
            };
            if v.info.expires_at_ms >= info.expires_at_ms {
                return Inserted::Stale;
            }
            self.remove(&victim);
        }
        self.bytes += signed.len();
        self.entries.insert(peer, Entry { info, signed });
        Inserted::New
    }

    fn remove(&mut self, peer: &PeerId) {
        if let Some(e) = self.entries.remove(peer) {
            self.bytes -= e.signed.len();
        }
    }

    /// Drops every entry expired at `now_ms`; returns how many.
    pub(crate) fn sweep(&mut self, now_ms: u64) -> usize {
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.info.expires_at_ms <= now_ms)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.remove(p);
        }
        gone.len()
    }

    /// The serving peers (not withdrawn, not expired at `now_ms`), of
    /// `model` when given.
    pub(crate) fn infos(&self, model: Option<&str>, now_ms: u64) -> Vec<(PeerId, ServerInfo)> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.info.state != ServerState::Offline
                    && e.info.expires_at_ms > now_ms
                    && model.is_none_or(|m| e.info.model_id == m)
            })
            .map(|(p, e)| (*p, e.info.clone()))
            .collect()
    }

    /// How many serving peers (not withdrawn, not expired at `now_ms`)
    /// the cache holds.
    pub(crate) fn serving(&self, now_ms: u64) -> usize {
        self.entries
            .values()
            .filter(|e| e.info.state != ServerState::Offline && e.info.expires_at_ms > now_ms)
            .count()
    }

    /// What this cache holds of `model` (all models: `None`), as a view
    /// request's digest: (peer tag, `issued_at_ms`).
    pub(crate) fn digest(&self, model: Option<&str>) -> Vec<(u64, u64)> {
        let mut d: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| model.is_none_or(|m| e.info.model_id == m))
            .map(|(p, e)| (digest_peer(p), e.info.issued_at_ms))
            .collect();
        d.truncate(nakshatra_protocol::rpc::MAX_VIEW_INFOS);
        d
    }

    /// Signed infos a peer whose cache holds `known` lacks (of `model`, not
    /// expired at `now_ms`), at most `max_infos` of them and `max_bytes`
    /// bytes in all; `true` when some were left out.
    pub(crate) fn missing(
        &self,
        known: &[(u64, u64)],
        model: Option<&str>,
        now_ms: u64,
        max_infos: usize,
        max_bytes: usize,
    ) -> (Vec<Vec<u8>>, bool) {
        let known: HashMap<u64, u64> = known.iter().copied().collect();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for (p, e) in &self.entries {
            if e.info.expires_at_ms <= now_ms || model.is_some_and(|m| e.info.model_id != m) {
                continue;
            }
            if known
                .get(&digest_peer(p))
                .is_some_and(|&at| at >= e.info.issued_at_ms)
            {
                continue;
            }
            // Framing: a length prefix per entry (a few bytes).
            if out.len() >= max_infos || bytes + e.signed.len() + 8 > max_bytes {
                more = true;
                break;
            }
            bytes += e.signed.len() + 8;
            out.push(e.signed.clone());
        }
        (out, more)
    }

    /// Peers held now (withdrawn ones included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model: &str, issued: u64, expires: u64, state: ServerState) -> ServerInfo {
        let mut i = ServerInfo::new(model, "llama", 10, 0..5, 64);
        i.issued_at_ms = issued;
        i.expires_at_ms = expires;
        i.state = state;
        i
    }

    #[test]
    fn newest_wins_tombstones_hold_and_entries_expire() {
        let m = "ab".repeat(32);
        let p = PeerId::random();
        let mut c = InfoCache::default();
        assert_eq!(
            c.insert(p, info(&m, 10, 100, ServerState::Online), vec![1; 10]),
            Inserted::New
        );
        assert_eq!(
            c.insert(p, info(&m, 5, 100, ServerState::Online), vec![1; 10]),
            Inserted::Stale
        );
        assert_eq!(c.infos(Some(&m), 50).len(), 1);
        // A withdrawal hides the peer; an older Online info cannot undo it.
        assert_eq!(
            c.insert(p, info(&m, 20, 120, ServerState::Offline), vec![1; 10]),
            Inserted::Newer
        );
        assert!(c.infos(Some(&m), 50).is_empty());
        assert_eq!(
            c.insert(p, info(&m, 15, 200, ServerState::Online), vec![1; 10]),
            Inserted::Stale
        );
        assert_eq!(c.sweep(119), 0);
        assert_eq!(c.sweep(120), 1);
        assert_eq!(c.len(), 0);
        assert_eq!(c.bytes, 0);
    }

    #[test]
    fn digest_leaves_out_what_the_asker_has_and_answers_are_bounded() {
        let m = "ab".repeat(32);
        let mut c = InfoCache::default();
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        for (k, p) in peers.iter().enumerate() {
            c.insert(
                *p,
                info(&m, 10 + k as u64, 100, ServerState::Online),
                vec![7; 100],
            );
        }
        let mut asker = InfoCache::default();
        asker.insert(
            peers[0],
            info(&m, 10, 100, ServerState::Online),
            vec![7; 100],
        );
        // Older than what the cache holds: sent again.
        asker.insert(
            peers[1],
            info(&m, 3, 100, ServerState::Online),
            vec![7; 100],
        );
        let (got, more) = c.missing(&asker.digest(None), None, 0, 100, 1 << 20);
        assert_eq!(got.len(), 4);
        assert!(!more);
        let (got, more) = c.missing(&[], None, 0, 2, 1 << 20);
        assert_eq!(got.len(), 2);
        assert!(more);
        let (got, more) = c.missing(&[], None, 0, 100, 250);
        assert_eq!(got.len(), 2);
        assert!(more);
        // Another model, or expired: nothing.
        assert!(c
            .missing(&[], Some(&"cd".repeat(32)), 0, 100, 1 << 20)
            .0
            .is_empty());
        assert!(c.missing(&[], None, 100, 100, 1 << 20).0.is_empty());
    }

    #[test]
    fn a_full_cache_keeps_the_longest_lived() {
        let m = "ab".repeat(32);
        let mut c = InfoCache::default();
        for k in 0..MAX_CACHED_INFOS {
            c.insert(
                PeerId::random(),
                info(&m, 1, 1000 + k as u64, ServerState::Online),
                vec![0; 4],
            );
        }
        // Expires before all of them: refused.
        assert_eq!(
            c.insert(
                PeerId::random(),
                info(&m, 1, 10, ServerState::Online),
                vec![0; 4]
            ),
            Inserted::Stale
        );
        // Outlives the first to expire: replaces it.
        assert_eq!(
            c.insert(
                PeerId::random(),
                info(&m, 1, 5000, ServerState::Online),
                vec![0; 4]
            ),
            Inserted::New
        );
        assert_eq!(c.len(), MAX_CACHED_INFOS);
        assert_eq!(c.sweep(1000), 0);
        assert_eq!(c.sweep(1001), 1);
    }
}
