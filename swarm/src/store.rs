//! The DHT store: Kademlia's records and provider records, with room
//! that strangers cannot take from the node itself.
//!
//! libp2p's `MemoryStore` counts the node's own provider keys and
//! everybody else's against one limit and never drops expired entries
//! unless kad's periodic jobs run (ours are off: re-announcing is the
//! event loop's). A peer flooding ADD_PROVIDER for random keys would fill
//! it for good, and the node could no longer announce its own blocks.
//! Here:
//! * the node's own records and provider records are always stored;
//! * each remote provider may hold at most [`MAX_KEYS_PER_PROVIDER`] keys
//!   (a real server provides one key per block plus two), and remote keys
//!   and records are capped in total;
//! * expired entries are dropped by [`Store::sweep`], which the event loop
//!   runs on its housekeeping tick, and before a full store refuses
//!   anything.

use std::borrow::Cow;
use std::collections::{hash_map, HashMap, HashSet};
use std::time::Instant;

use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;
use nakshatra_protocol::MAX_LAYERS;

/// Provider keys one remote peer may have stored here: a server announces
/// one key per block it holds plus the models key and its model's key.
pub(crate) const MAX_KEYS_PER_PROVIDER: usize = MAX_LAYERS as usize + 2;

/// How much of other peers' data the store keeps.
#[derive(Debug, Clone)]
pub(crate) struct StoreLimits {
    /// Records published by other peers.
    pub(crate) max_records: usize,
    /// Largest record value, bytes (exclusive).
    pub(crate) max_value_bytes: usize,
    /// Providers kept per key (the first ones; later ones are ignored, as
    /// libp2p's store does, against Sybil floods of one key).
    pub(crate) max_providers_per_key: usize,
    /// Provider keys with at least one remote provider.
    pub(crate) max_remote_provider_keys: usize,
}

/// The store (see the module doc).
pub(crate) struct Store {
    local: PeerId,
    limits: StoreLimits,
    records: HashMap<RecordKey, Record>,
    providers: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// This node's own provider records.
    provided: HashSet<ProviderRecord>,
    /// Keys each remote provider has here.
    keys_of: HashMap<PeerId, usize>,
}

impl Store {
    pub(crate) fn new(local: PeerId, limits: StoreLimits) -> Self {
        Self {
            local,
            limits,
            records: HashMap::new(),
            providers: HashMap::new(),
            provided: HashSet::new(),
            keys_of: HashMap::new(),
        }
    }

    /// Drops every expired record and remote provider record (this node's
    /// own are re-announced by the event loop, never swept).
    pub(crate) fn sweep(&mut self, now: Instant) {
        let local = self.local;
        self.records
            .retain(|_, r| r.publisher == Some(local) || !r.is_expired(now));
        let keys_of = &mut self.keys_of;
        self.providers.retain(|_, list| {
            list.retain(|p| {
                let keep = p.provider == local || !p.is_expired(now);
                if !keep {
                    forget_key(keys_of, &p.provider);
                }
                keep
            });
            !list.is_empty()
        });
    }

    /// Records and provider keys held now.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.records.len(), self.providers.len())
    }

    fn remote_records(&self) -> usize {
        let local = Some(self.local);
        self.records
            .values()
            .filter(|r| r.publisher != local)
            .count()
    }

    fn remote_keys(&self) -> usize {
        let local = self.local;
        self.providers
            .values()
            .filter(|l| l.iter().any(|p| p.provider != local))
            .count()
    }

    /// Whether a new key from remote `provider` fits (sweeping expired
    /// entries first when the store looks full).
    fn room_for_remote_key(&mut self, provider: &PeerId) -> bool {
        if self.keys_of.get(provider).copied().unwrap_or(0) >= MAX_KEYS_PER_PROVIDER {
            return false;
        }
        if self.remote_keys() >= self.limits.max_remote_provider_keys {
            self.sweep(Instant::now());
        }
        self.remote_keys() < self.limits.max_remote_provider_keys
    }
}

fn forget_key(keys_of: &mut HashMap<PeerId, usize>, provider: &PeerId) {
    if let Some(n) = keys_of.get_mut(provider) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            keys_of.remove(provider);
        }
    }
}

impl RecordStore for Store {
    type RecordsIter<'a> =
        std::iter::Map<hash_map::Values<'a, RecordKey, Record>, fn(&'a Record) -> Cow<'a, Record>>;
    type ProvidedIter<'a> = std::iter::Map<
        std::collections::hash_set::Iter<'a, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(k).map(Cow::Borrowed)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        if r.value.len() >= self.limits.max_value_bytes {
            return Err(Error::ValueTooLarge);
        }
        let local = r.publisher == Some(self.local);
        if !local && !self.records.contains_key(&r.key) {
            if self.remote_records() >= self.limits.max_records {
                self.sweep(Instant::now());
            }
            if self.remote_records() >= self.limits.max_records {
                return Err(Error::MaxRecords);
            }
        }
        self.records.insert(r.key.clone(), r);
        Ok(())
    }

    fn remove(&mut self, k: &RecordKey) {
        self.records.remove(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.values().map(Cow::Borrowed)
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let local = record.provider == self.local;
        let known = self
            .providers
            .get(&record.key)
            .is_some_and(|l| l.iter().any(|p| p.provider == record.provider));
        if !known && !local && !self.room_for_remote_key(&record.provider) {
            return Err(Error::MaxProvidedKeys);
        }
        let list = self.providers.entry(record.key.clone()).or_default();
        if let Some(p) = list.iter_mut().find(|p| p.provider == record.provider) {
            // An update in place (new expiry or addresses).
            if local {
                self.provided.remove(p);
                self.provided.insert(record.clone());
            }
            *p = record;
            return Ok(());
        }
        if list.len() >= self.limits.max_providers_per_key {
            if !local {
                // Full: later providers are ignored.
                return Ok(());
            }
            // This node's own record always fits: it takes the place of
            // the last remote one.
            if let Some(i) = list.iter().rposition(|p| p.provider != self.local) {
                let gone = list.remove(i);
                forget_key(&mut self.keys_of, &gone.provider);
            }
        }
        if local {
            self.provided.insert(record.clone());
        } else {
            *self.keys_of.entry(record.provider).or_default() += 1;
        }
        list.push(record);
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let now = Instant::now();
        self.providers
            .get(key)
            .map(|l| l.iter().filter(|p| !p.is_expired(now)).cloned().collect())
            .unwrap_or_default()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.provided.iter().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let hash_map::Entry::Occupied(mut e) = self.providers.entry(k.clone()) else {
            return;
        };
        if let Some(i) = e.get().iter().position(|r| &r.provider == p) {
            let gone = e.get_mut().remove(i);
            if gone.provider == self.local {
                self.provided.remove(&gone);
            } else {
                forget_key(&mut self.keys_of, p);
            }
        }
        if e.get().is_empty() {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn store(local: PeerId) -> Store {
        Store::new(
            local,
            StoreLimits {
                max_records: 4,
                max_value_bytes: 100,
                max_providers_per_key: 2,
                max_remote_provider_keys: 8,
            },
        )
    }

    fn provider(key: &str, p: PeerId, expires: Option<Instant>) -> ProviderRecord {
        ProviderRecord {
            key: RecordKey::new(&key),
            provider: p,
            expires,
            addresses: Vec::new(),
        }
    }

    #[test]
    fn a_flood_of_keys_never_crowds_out_the_node_itself() {
        let me = PeerId::random();
        let mut s = store(me);
        // Sybils fill every remote slot.
        for i in 0..100 {
            let _ = s.add_provider(provider(&format!("k{i}"), PeerId::random(), None));
        }
        assert_eq!(s.remote_keys(), 8);
        // Our own keys still go in, and are found.
        for i in 0..20 {
            s.add_provider(provider(&format!("mine{i}"), me, None))
                .unwrap();
        }
        assert_eq!(s.provided().count(), 20);
        assert_eq!(s.providers(&RecordKey::new(&"mine7")).len(), 1);
        // A key full of strangers still takes ours.
        let (a, b) = (PeerId::random(), PeerId::random());
        let _ = s.add_provider(provider("k0", a, None));
        let _ = s.add_provider(provider("k0", b, None));
        s.add_provider(provider("k0", me, None)).unwrap();
        assert!(s
            .providers(&RecordKey::new(&"k0"))
            .iter()
            .any(|p| p.provider == me));
    }

    #[test]
    fn one_peer_gets_a_bounded_number_of_keys_and_expired_ones_go() {
        let me = PeerId::random();
        let mut s = Store::new(
            me,
            StoreLimits {
                max_records: 4,
                max_value_bytes: 100,
                max_providers_per_key: 2,
                max_remote_provider_keys: usize::MAX,
            },
        );
        let evil = PeerId::random();
        let soon = Instant::now() + Duration::from_millis(1);
        let mut stored = 0;
        for i in 0..MAX_KEYS_PER_PROVIDER + 50 {
            if s.add_provider(provider(&format!("k{i}"), evil, Some(soon)))
                .is_ok()
            {
                stored += 1;
            }
        }
        assert_eq!(stored, MAX_KEYS_PER_PROVIDER);
        std::thread::sleep(Duration::from_millis(5));
        s.sweep(Instant::now());
        assert_eq!(s.sizes(), (0, 0));
        assert!(s.keys_of.is_empty());
        // Records: strangers are capped, ours are not.
        for i in 0..10 {
            let _ = s.put(Record {
                key: RecordKey::new(&format!("r{i}")),
                value: vec![1],
                publisher: Some(PeerId::random()),
                expires: None,
            });
        }
        s.put(Record {
            key: RecordKey::new(&"mine"),
            value: vec![1],
            publisher: Some(me),
            expires: None,
        })
        .unwrap();
        assert_eq!(s.sizes().0, 5);
    }
}
