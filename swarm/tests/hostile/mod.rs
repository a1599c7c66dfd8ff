//! A hostile node (a bare libp2p swarm speaking our Kademlia protocol, not
//! our code) puts forged, tampered, expired, oversized and foreign records
//! into the DHT. Honest nodes must drop them, the views must not show the
//! hostile node, and nobody may panic.

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
use libp2p::{
    identify,
    kad::{
        self,
        store::{MemoryStore, MemoryStoreConfig, RecordStore},
        Mode, QueryId, Quorum, Record, RecordKey,
    },
    noise,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder,
};
use nakshatra_swarm::{
    protocol::{self, keys, now_ms, SignedServerInfo},
    signing_key, IdentityKeypair, Role, KAD_PROTOCOL,
};
use tokio::sync::oneshot;

use crate::common::*;

#[derive(NetworkBehaviour)]
struct Evil {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

/// A bare libp2p node speaking our Kademlia protocol (as a DHT server)
/// and identify, with a store of `store` size, listening on loopback.
fn evil_swarm(key: IdentityKeypair, store: MemoryStoreConfig) -> Swarm<Evil> {
    let mut swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|k| {
            let id = k.public().to_peer_id();
            let mut cfg = kad::Config::new(KAD_PROTOCOL);
            cfg.set_max_packet_size(1 << 20);
            let store = MemoryStore::with_config(id, store);
            let mut kad = kad::Behaviour::with_config(id, store, cfg);
            kad.set_mode(Some(Mode::Server));
            Evil {
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/nakshatra/1".into(),
                    k.public(),
                )),
            }
        })
        .unwrap()
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    swarm
}

/// The query `event` finished, if it finished one.
fn finished(event: SwarmEvent<EvilEvent>) -> Option<QueryId> {
    match event {
        SwarmEvent::Behaviour(EvilEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            step,
            ..
        })) if step.last => Some(id),
        _ => None,
    }
}

fn record(key: String, value: Vec<u8>) -> Record {
    Record {
        key: RecordKey::new(&key),
        value,
        publisher: None,
        expires: None,
    }
}

/// Starts the hostile node: connects to `targets`, puts every kind of bad
/// record to them (one of them impersonating `victim`), provides every
/// block of `model` plus a foreign key, and reports on `done` once all of
/// that went out. Keeps running (answering queries with its bad local
/// record) until the test ends.
fn spawn_hostile(
    targets: Vec<(PeerId, Multiaddr)>,
    model: String,
    victim: PeerId,
) -> (PeerId, oneshot::Receiver<()>) {
    let key = IdentityKeypair::generate_ed25519();
    let evil_peer = key.public().to_peer_id();
    let evil_sk = signing_key(&key).unwrap();
    let other_sk = signing_key(&IdentityKeypair::generate_ed25519()).unwrap();
    let (done_tx, done_rx) = oneshot::channel();

    tokio::spawn(async move {
        let mut swarm = evil_swarm(key, MemoryStoreConfig::default());
        for (peer, addr) in &targets {
            swarm.behaviour_mut().kad.add_address(peer, addr.clone());
            swarm.dial(addr.clone()).unwrap();
        }
        let target_peers: HashSet<PeerId> = targets.iter().map(|(p, _)| *p).collect();
        let mut connected = HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while connected != target_peers && tokio::time::Instant::now() < deadline {
            if let Ok(Some(SwarmEvent::ConnectionEstablished { peer_id, .. })) =
                tokio::time::timeout(Duration::from_millis(200), swarm.next()).await
            {
                connected.insert(peer_id);
            }
        }

        let now = now_ms();
        let mut info = fake_info(&model, 0, 30);
        info.issued_at_ms = now;
        info.expires_at_ms = now + 60_000;
        let mut bad: Vec<Record> = Vec::new();
        // Signed by another key, stored under the hostile node's key.
        bad.push(record(
            keys::info_key(&evil_peer),
            protocol::sign(&other_sk, &info).unwrap().to_bytes(),
        ));
        // Its own key, payload tampered after signing.
        let mut tampered = protocol::sign(&evil_sk, &info).unwrap();
        tampered.payload[3] ^= 0x40;
        let tampered = record(keys::info_key(&evil_peer), tampered.to_bytes());
        bad.push(tampered.clone());
        // Impersonation: a valid record of its own stored under the victim's key.
        bad.push(record(
            keys::info_key(&victim),
            protocol::sign(&evil_sk, &info).unwrap().to_bytes(),
        ));
        // Expired.
        let mut old = info.clone();
        old.issued_at_ms = now - 120_000;
        old.expires_at_ms = now - 60_000;
        bad.push(record(
            keys::info_key(&evil_peer),
            protocol::sign(&evil_sk, &old).unwrap().to_bytes(),
        ));
        // Oversized (validly signed).
        bad.push(record(
            keys::info_key(&evil_peer),
            SignedServerInfo::sign_raw(&evil_sk, protocol::PROTOCOL_VERSION, vec![7; 20_000])
                .to_bytes(),
        ));
        // Garbage under our key, and under a foreign key.
        bad.push(record(
            keys::info_key(&evil_peer),
            vec![0xde, 0xad, 0xbe, 0xef],
        ));
        bad.push(record("/foo/bar".into(), b"anything".to_vec()));

        let kad = &mut swarm.behaviour_mut().kad;
        // What the hostile node itself answers to GET_VALUE.
        kad.store_mut().put(tampered).unwrap();
        let mut pending: HashSet<QueryId> = HashSet::new();
        for r in bad {
            pending.insert(kad.put_record_to(r, target_peers.iter().copied(), Quorum::One));
        }
        let mut provided = vec![keys::MODELS_KEY.to_string(), keys::model_key(&model)];
        provided.extend((0..30).map(|b| keys::block_key(&model, b)));
        provided.push("/evil/key".into());
        for k in provided {
            pending.insert(kad.start_providing(RecordKey::new(&k)).unwrap());
        }

        let mut done_tx = Some(done_tx);
        loop {
            if let Some(id) = finished(swarm.select_next_some().await) {
                pending.remove(&id);
                if pending.is_empty() {
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        }
    });
    (evil_peer, done_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_dropped() {
    init_tracing();
    let model = model_id(0x66);
    let s0 = start(Role::Server, vec![]).await;
    let s1 = start(Role::Server, vec![s0.addr.clone().unwrap()]).await;
    s0.client.announce(fake_info(&model, 0, 15)).await.unwrap();
    s1.client.announce(fake_info(&model, 15, 30)).await.unwrap();
    let client = start(Role::Client, vec![s0.addr.clone().unwrap()]).await;
    wait_for(Duration::from_secs(15), "full coverage", || async {
        let v = client.client.model_view(&model).await.unwrap();
        v.is_fully_covered().then_some(())
    })
    .await;

    let strip = |a: &Multiaddr| {
        let mut a = a.clone();
        a.pop();
        a
    };
    let (evil, done) = spawn_hostile(
        vec![
            (s0.peer(), strip(s0.addr.as_ref().unwrap())),
            (s1.peer(), strip(s1.addr.as_ref().unwrap())),
        ],
        model.clone(),
        s0.peer(),
    );
    tokio::time::timeout(Duration::from_secs(20), done)
        .await
        .expect("hostile node finished its puts")
        .unwrap();

    // Seven bad records to each of two servers, one foreign provider key
    // to each.
    wait_for(Duration::from_secs(10), "rejections", || async {
        let a = s0.client.stats().await.unwrap();
        let b = s1.client.stats().await.unwrap();
        let records = a.records_rejected + b.records_rejected;
        let providers = a.providers_rejected + b.providers_rejected;
        (records >= 14 && providers >= 2).then_some(())
    })
    .await;

    for s in [&s0, &s1] {
        // Nothing of the hostile node's got stored...
        assert_eq!(
            s.client.local_record(&keys::info_key(&evil)).await.unwrap(),
            None
        );
        assert_eq!(s.client.local_record("/foo/bar").await.unwrap(), None);
    }
    // ... and the impersonated record did not replace the genuine one.
    let genuine = s1
        .client
        .local_record(&keys::info_key(&s0.peer()))
        .await
        .unwrap()
        .expect("s0's record");
    let v = protocol::verify(&genuine, Some(&s0.peer()), now_ms()).unwrap();
    assert_eq!(v.info.range(), 0..15);

    // Block holders come from verified infos only: the hostile node's
    // provider records for every block do not make it a holder ...
    let holders = client.client.block_holders(&model, 3).await.unwrap();
    assert!(!holders.contains(&evil), "{holders:?}");
    assert!(!holders.is_empty(), "{holders:?}");
    // ... and without a valid info it never makes it into a view.
    assert!(client.client.server_info(evil).await.is_err());
    let v = client.client.model_view(&model).await.unwrap();
    assert_eq!(v.peers.len(), 2, "{:?}", v.peers);
    assert!(v.peers.iter().all(|p| p.peer_id != evil));
    assert!(v.coverage.iter().flatten().all(|p| *p != evil));
    assert!(v.is_fully_covered());
    let sv = client.client.swarm_view().await.unwrap();
    assert_eq!(sv.models.len(), 1);
    assert_eq!(sv.models[0].peers.len(), 2);

    // Nobody panicked.
    assert!(!s0.task.is_finished() && !s1.task.is_finished() && !client.task.is_finished());
}

/// Provider keys the flood sends: every block of random model ids, in
/// the nakshatra key layout (so the key filter alone lets them through).
const FLOOD_PROVIDER_KEYS: usize = 20_000;
/// Signed infos of fresh identities the flood puts.
const FLOOD_RECORDS: usize = 500;
/// Provider queries the flooding node runs at once.
const FLOOD_BATCH: usize = 500;

/// A hostile node floods `victim` with ADD_PROVIDER for random model ids
/// and with validly signed infos of identities that are not its own.
/// Returns once every put went out.
async fn flood(victim: (PeerId, Multiaddr)) {
    let mut swarm = evil_swarm(
        IdentityKeypair::generate_ed25519(),
        MemoryStoreConfig {
            max_provided_keys: FLOOD_PROVIDER_KEYS + 100,
            ..Default::default()
        },
    );
    swarm
        .behaviour_mut()
        .kad
        .add_address(&victim.0, victim.1.clone());
    swarm.dial(victim.1.clone()).unwrap();

    let mut keys: Vec<String> = Vec::with_capacity(FLOOD_PROVIDER_KEYS);
    let mut n = 0u32;
    while keys.len() < FLOOD_PROVIDER_KEYS {
        let model = format!("{:064x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15);
        keys.extend((0..20).map(|b| keys::block_key(&model, b)));
        n += 1;
    }
    let now = now_ms();
    let mut records = Vec::new();
    for i in 0..FLOOD_RECORDS {
        let id = IdentityKeypair::generate_ed25519();
        let sk = signing_key(&id).unwrap();
        let mut info = fake_info(&format!("{:064x}", i + 1), 0, 30);
        info.issued_at_ms = now;
        info.expires_at_ms = now + 60_000;
        records.push(record(
            keys::info_key(&id.public().to_peer_id()),
            protocol::sign(&sk, &info).unwrap().to_bytes(),
        ));
    }
    let kad = &mut swarm.behaviour_mut().kad;
    let mut pending: HashSet<QueryId> = records
        .into_iter()
        .map(|r| kad.put_record_to(r, std::iter::once(victim.0), Quorum::One))
        .collect();
    let mut keys = keys.into_iter();
    loop {
        while pending.len() < FLOOD_BATCH {
            let Some(k) = keys.next() else { break };
            let kad = &mut swarm.behaviour_mut().kad;
            pending.insert(kad.start_providing(RecordKey::new(&k)).unwrap());
        }
        if pending.is_empty() {
            return;
        }
        if let Some(id) = finished(swarm.select_next_some().await) {
            pending.remove(&id);
        }
    }
}

/// A flood of 20,000 provider records for random model ids and 500
/// strangers' signed infos does not stop the victim from announcing (its
/// blocks stay findable by a third node), one peer's provider keys are
/// capped, the strangers' infos are refused, and expired entries leave the
/// store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_store_still_takes_the_nodes_own_announcements() {
    init_tracing();
    let model = model_id(0x77);
    let victim = start(Role::Server, vec![]).await;
    let third = start(Role::Client, vec![victim.addr.clone().unwrap()]).await;
    let mut addr = victim.addr.clone().unwrap();
    addr.pop();
    tokio::time::timeout(Duration::from_secs(240), flood((victim.peer(), addr)))
        .await
        .expect("the flood went out");

    let stats = victim.client.stats().await.unwrap();
    eprintln!(
        "after the flood: {} provider records stored, {} refused; {} records stored, {} refused",
        stats.providers_accepted,
        stats.providers_rejected,
        stats.records_accepted,
        stats.records_rejected
    );
    assert!(stats.records_rejected >= FLOOD_RECORDS as u64, "{stats:?}");
    assert_eq!(stats.stored_records, 0, "{stats:?}");
    assert!(stats.providers_rejected > 0, "{stats:?}");
    assert!(
        stats.stored_provider_keys <= nakshatra_swarm::protocol::MAX_LAYERS as usize + 2,
        "one peer's keys are not capped: {stats:?}"
    );

    // The victim announces after the flood; a third node finds it.
    victim
        .client
        .announce(fake_info(&model, 0, 30))
        .await
        .unwrap();
    wait_for(Duration::from_secs(15), "the victim's blocks", || async {
        let h = third.client.block_holders(&model, 17).await.unwrap();
        h.contains(&victim.peer()).then_some(())
    })
    .await;

    // The flood's provider records expire (TTL) and are swept; the
    // victim's own stay.
    wait_for(TTL * 3, "expired provider records swept", || async {
        let s = victim.client.stats().await.unwrap();
        (s.stored_provider_keys <= 32).then_some(())
    })
    .await;
    assert!(!victim.task.is_finished());
}
