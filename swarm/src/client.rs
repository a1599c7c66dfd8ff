//! The cloneable handle to a running node.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use futures::{stream, StreamExt};
use libp2p::{kad::RecordKey, Multiaddr, PeerId};
use nakshatra_protocol::{
    keys, now_ms, rpc::InfoResponse, validate_model_id, verify, RecordError, ServerInfo,
    ServerState, MAX_LAYERS,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{AnnounceError, InfoError, LookupError, Stopped},
    event_loop::{Command, SwarmStats},
    view::{build_model_view, ModelView, SwarmView},
};

/// How long [`Client::listen_addrs`] waits for the listeners to come up.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long [`Client::rtt`] waits for a first ping.
const RTT_WAIT: Duration = Duration::from_secs(5);
/// How long the views wait for each peer's first ping.
const VIEW_RTT_WAIT: Duration = Duration::from_secs(3);
/// Most lookups / info requests a view runs at once.
const CONCURRENCY: usize = 32;

/// Handle to a running swarm node (see [`crate::spawn`]). Cheap to clone;
/// every method sends a command to the event loop and waits for its
/// answer. Once the event loop has stopped, methods fail with
/// [`Stopped`].
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
}

impl Client {
    pub(crate) fn new(tx: mpsc::Sender<Command>, peer_id: PeerId) -> Self {
        Client { tx, peer_id }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses this node listens on, once at least one listener is
    /// up (waits up to 10 s; empty for a node that listens nowhere).
    /// Wildcard listen addresses (`0.0.0.0`) come back expanded to each
    /// interface. Print them as `<addr>/p2p/<peer id>` for others to
    /// bootstrap from.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::ListenAddrs { reply: tx })
            .await
            .map_err(|_| Stopped)?;
        match tokio::time::timeout(LISTEN_WAIT, rx).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(_)) => Err(Stopped),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Announces `info` (the node's model, layer range, devices, ...):
    /// provides `/nakshatra/1/models`, `/nakshatra/1/model/{id}` and
    /// `/nakshatra/1/block/{id}/{b}` for every held block, and puts the
    /// signed info record at `/nakshatra/1/info/{peer id}`. Then repeats
    /// every `refresh` with fresh `issued_at` / `expires_at`
    /// (`issued_at + record_ttl`).
    ///
    /// The event loop fills in `protocol_version`, the timestamps, and
    /// `listen_addrs` when left empty, and signs with the node's own key
    /// (so the record is bound to this PeerId). Calling it again replaces
    /// the announcement (e.g. when free sessions change); keys of blocks no
    /// longer held stop being provided. Returns once the records are stored
    /// locally and their publication started; lookups elsewhere see them
    /// within a DHT round trip.
    pub async fn announce(&self, info: ServerInfo) -> Result<(), AnnounceError> {
        self.call(|reply| Command::Announce {
            info: Box::new(info),
            reply,
        })
        .await?
    }

    /// Withdraws the announcement: stops providing every key, stops
    /// answering `/nakshatra/info/1` with an info, and puts a signed
    /// `Offline` tombstone over the info record, waiting until that put
    /// finished. Askers drop the node at once; its provider records on
    /// other nodes expire after `record_ttl`. No-op when not announcing.
    pub async fn withdraw(&self) -> Result<(), Stopped> {
        self.call(|reply| Command::Withdraw { reply }).await
    }

    /// Providers of an arbitrary DHT key (not verified: a provider record
    /// only says that the PeerId who sent it claims the key).
    async fn providers(&self, key: &str) -> Result<HashSet<PeerId>, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::GetProviders { key, reply })
            .await
    }

    /// Every node providing `/nakshatra/1/models`, i.e. every serving node
    /// the DHT knows of (up to 256 per storing node). Unverified.
    pub async fn serving_peers(&self) -> Result<Vec<PeerId>, Stopped> {
        Ok(sorted(self.providers(keys::MODELS_KEY).await?))
    }

    /// Nodes providing `/nakshatra/1/model/{model_id}`. Unverified.
    pub async fn model_peers(&self, model_id: &str) -> Result<Vec<PeerId>, LookupError> {
        validate_model_id(model_id)?;
        Ok(sorted(self.providers(&keys::model_key(model_id)).await?))
    }

    /// Holders of block `block` of `model_id` per their provider records
    /// (one Kademlia lookup, O(log n) hops). Unverified: check each with
    /// [`Client::server_info`] before relying on it.
    pub async fn block_holders(
        &self,
        model_id: &str,
        block: u32,
    ) -> Result<Vec<PeerId>, LookupError> {
        validate_model_id(model_id)?;
        if block >= MAX_LAYERS {
            return Ok(Vec::new());
        }
        Ok(sorted(
            self.providers(&keys::block_key(model_id, block)).await?,
        ))
    }

    /// `peer`'s current info, verified (signature, binding to `peer`,
    /// version, freshness, fields).
    ///
    /// Asks the peer directly over `/nakshatra/info/1` first (freshest, and
    /// it opens the connection RTT is measured on). If the peer cannot be
    /// reached or its answer does not verify, reads the info record from
    /// the DHT and keeps the newest record that verifies. A peer that
    /// answers "not serving", or whose newest record is a withdrawal
    /// tombstone, gives [`InfoError::NotServing`].
    pub async fn server_info(&self, peer: PeerId) -> Result<ServerInfo, InfoError> {
        let mut last: Option<RecordError> = None;
        match self
            .call(|reply| Command::RequestInfo { peer, reply })
            .await?
        {
            Ok(InfoResponse::Serving(bytes)) => match verify(&bytes, Some(&peer), now_ms()) {
                Ok(v) if v.info.state == ServerState::Offline => {
                    return Err(InfoError::NotServing(peer))
                }
                Ok(v) => return Ok(v.info),
                Err(e) => {
                    tracing::warn!(%peer, reason = %e, "dropping invalid info answered by the peer");
                    last = Some(e);
                }
            },
            Ok(InfoResponse::NotServing) => return Err(InfoError::NotServing(peer)),
            Err(why) => {
                tracing::debug!(%peer, %why, "direct info request failed; reading the DHT");
            }
        }

        let records = self
            .call(|reply| Command::GetInfoRecords { peer, reply })
            .await?;
        let now = now_ms();
        let mut best: Option<ServerInfo> = None;
        for bytes in records {
            match verify(&bytes, Some(&peer), now) {
                Ok(v) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| v.info.issued_at_ms > b.issued_at_ms)
                    {
                        best = Some(v.info);
                    }
                }
                Err(e) => {
                    tracing::warn!(%peer, reason = %e, "dropping invalid DHT record");
                    last = Some(e);
                }
            }
        }
        match best {
            Some(info) if info.state == ServerState::Offline => Err(InfoError::NotServing(peer)),
            Some(info) => {
                // Let later dials (RTT, sessions) use the addresses the
                // peer signed.
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                if !addrs.is_empty() {
                    let _ = self.tx.send(Command::LearnAddrs { peer, addrs }).await;
                }
                Ok(info)
            }
            None => Err(InfoError::NotFound { peer, last }),
        }
    }

    /// Round-trip time to `peer` from libp2p ping: the latest measurement,
    /// or else (dialling the peer if needed) the first one within 5 s.
    /// `None` if the peer cannot be reached or the loop has stopped.
    pub async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        self.rtt_within(peer, RTT_WAIT).await
    }

    async fn rtt_within(&self, peer: PeerId, wait: Duration) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Rtt {
                peer,
                dial: true,
                reply: tx,
            })
            .await
            .ok()?;
        tokio::time::timeout(wait, rx).await.ok()?.ok()?
    }

    /// Peers with an open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, Stopped> {
        self.call(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Counters: records accepted/refused, connections, routing table size.
    pub async fn stats(&self) -> Result<SwarmStats, Stopped> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// The value stored under `key` in this node's local DHT store, if any
    /// (diagnostics: what this node would answer for `key`).
    pub async fn local_record(&self, key: &str) -> Result<Option<Vec<u8>>, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::LocalRecord { key, reply }).await
    }

    /// Puts `value` under `key` into the DHT as is: no signing, no checks.
    /// For fault-injection tests only (a node that publishes bad records);
    /// honest code never needs it. Returns whether the put was started.
    #[doc(hidden)]
    pub async fn put_raw_record(&self, key: &str, value: Vec<u8>) -> Result<bool, Stopped> {
        let key = RecordKey::new(&key);
        self.call(|reply| Command::PutRaw { key, value, reply })
            .await
    }

    /// The view of one model: holders of every block, each serving peer's
    /// verified info and RTT, and the gaps.
    ///
    /// Looks up `/nakshatra/1/model/{id}` and then every block key (so
    /// holders are found even if the model key's provider list is full),
    /// reads each candidate's info ([`Client::server_info`]) and drops
    /// every peer whose info does not verify or is not for this model.
    /// A model nobody serves gives `n_layers == 0` and empty lists.
    pub async fn model_view(&self, model_id: &str) -> Result<ModelView, LookupError> {
        validate_model_id(model_id)?;
        let mut infos = HashMap::new();
        Ok(self.model_view_with(model_id, &mut infos).await?)
    }

    /// The view of every model served in the swarm: enumerates serving
    /// nodes through `/nakshatra/1/models`, reads their infos, then builds
    /// each model's view as [`Client::model_view`] does. This is what
    /// `nakshatra swarm status` prints (serialize it with serde; the JSON
    /// keys are fixed).
    pub async fn swarm_view(&self) -> Result<SwarmView, Stopped> {
        let serving = self.providers(keys::MODELS_KEY).await?;
        let mut infos: HashMap<PeerId, Option<ServerInfo>> = HashMap::new();
        self.fetch_infos(serving, &mut infos).await?;
        let ids: BTreeSet<String> = infos
            .values()
            .flatten()
            .map(|i| i.model_id.clone())
            .collect();
        let mut models = Vec::new();
        for id in ids {
            models.push(self.model_view_with(&id, &mut infos).await?);
        }
        Ok(SwarmView { models })
    }

    async fn model_view_with(
        &self,
        model_id: &str,
        infos: &mut HashMap<PeerId, Option<ServerInfo>>,
    ) -> Result<ModelView, Stopped> {
        let candidates = self.providers(&keys::model_key(model_id)).await?;
        self.fetch_infos(candidates, infos).await?;

        // Every block key, with the layer count the servers agree on.
        let known: Vec<(PeerId, ServerInfo)> = infos_of(infos, model_id);
        let n_layers = build_model_view(model_id, &known, &HashMap::new()).n_layers;
        let lookups: Vec<Result<HashSet<PeerId>, Stopped>> = stream::iter(0..n_layers)
            .map(|b| async move { self.providers(&keys::block_key(model_id, b)).await })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut holders = HashSet::new();
        for found in lookups {
            holders.extend(found?);
        }
        self.fetch_infos(holders, infos).await?;

        let known = infos_of(infos, model_id);
        let rtts: HashMap<PeerId, Duration> = stream::iter(known.iter().map(|(p, _)| *p))
            .map(|p| async move { (p, self.rtt_within(p, VIEW_RTT_WAIT).await) })
            .buffer_unordered(CONCURRENCY)
            .filter_map(|(p, r)| async move { r.map(|r| (p, r)) })
            .collect()
            .await;
        Ok(build_model_view(model_id, &known, &rtts))
    }

    /// Fetches (concurrently) the info of every peer not fetched yet.
    async fn fetch_infos(
        &self,
        peers: HashSet<PeerId>,
        infos: &mut HashMap<PeerId, Option<ServerInfo>>,
    ) -> Result<(), Stopped> {
        let new: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| !infos.contains_key(p))
            .collect();
        let results: Vec<(PeerId, Result<ServerInfo, InfoError>)> = stream::iter(new)
            .map(|p| async move { (p, self.server_info(p).await) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (peer, result) in results {
            match result {
                Ok(info) => {
                    infos.insert(peer, Some(info));
                }
                Err(InfoError::Stopped(s)) => return Err(s),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no usable info");
                    infos.insert(peer, None);
                }
            }
        }
        Ok(())
    }

    /// Gracefully leaves: [`Client::withdraw`]s, then stops the event loop
    /// (its `JoinHandle` completes). Other clones fail with [`Stopped`]
    /// afterwards. To simulate a crash instead, abort the `JoinHandle`.
    pub async fn shutdown(&self) -> Result<(), Stopped> {
        self.withdraw().await?;
        self.call(|reply| Command::Shutdown { reply }).await
    }
}

fn sorted(set: HashSet<PeerId>) -> Vec<PeerId> {
    let mut v: Vec<PeerId> = set.into_iter().collect();
    v.sort_by_key(|p| p.to_base58());
    v
}

fn infos_of(
    infos: &HashMap<PeerId, Option<ServerInfo>>,
    model_id: &str,
) -> Vec<(PeerId, ServerInfo)> {
    infos
        .iter()
        .filter_map(|(p, i)| i.as_ref().map(|i| (*p, i.clone())))
        .filter(|(_, i)| i.model_id == model_id)
        .collect()
}
