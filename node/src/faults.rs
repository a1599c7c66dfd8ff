//! Test-only fault injection, all of it in this file.
//!
//! The e2e tests need nodes that misbehave: a slow link (this sandbox has
//! no netem), a peer that serves corrupt pieces, a peer that publishes
//! forged DHT records. That code exists only with the `fault-injection`
//! cargo feature, which `scripts/test.sh` turns on; a production build
//! (`cargo build --release -p nakshatra`, `cargo install`) has none of it:
//! no hidden flags, no branches. Production code holds a [`Faults`] and
//! calls its hooks; without the feature `Faults` is empty and every hook
//! is a no-op the compiler removes.

#[cfg(feature = "fault-injection")]
use std::time::Duration;

/// The faults a node was told to commit (none in a production build).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// What the node does wrong (`--fault`).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
    /// A simulated slow link (`--test-link-delay-ms`): added before every
    /// probe echo, activation frame and piece chunk this node handles.
    #[cfg(feature = "fault-injection")]
    pub link_delay: Option<Duration>,
}

/// Faults a test can ask a serving node to commit (`--fault`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Keep publishing forged DHT records: another peer's info signed by a
    /// stranger's key, a tampered signed record claiming the whole model,
    /// an expired record, an oversized one and garbage.
    ForgeRecords,
    /// Serve pieces with a byte flipped in every chunk.
    CorruptPieces,
}

impl Faults {
    /// Sets the swarm's probe echo delay to the simulated link delay.
    pub fn configure_swarm(&self, _cfg: &mut nakshatra_swarm::SwarmConfig) {
        #[cfg(feature = "fault-injection")]
        {
            _cfg.test_link_delay = self.link_delay;
        }
    }

    /// Waits out the simulated link delay (before handling a frame).
    pub async fn link_delay(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(d) = self.link_delay {
            tokio::time::sleep(d).await;
        }
    }

    /// With [`Fault::CorruptPieces`], the chunk made of `parts` with a byte
    /// flipped, to be served instead; else `None`.
    pub fn corrupt_chunk(&self, _parts: &[&[u8]]) -> Option<Vec<u8>> {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::CorruptPieces) {
            let mut data = _parts.concat();
            let mid = data.len() / 2;
            if let Some(b) = data.get_mut(mid) {
                *b ^= 0xff;
            }
            return Some(data);
        }
        None
    }

    /// With [`Fault::ForgeRecords`], publishes one round of bad records
    /// (see there); called on the node's periodic tick.
    pub async fn on_tick(
        &self,
        _node: &crate::serve::ServingNode,
        _data_dir: &crate::datadir::DataDir,
    ) {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::ForgeRecords) {
            match forge_records(_node, _data_dir).await {
                Ok(n) => tracing::warn!("fault injection: published {n} forged records"),
                Err(e) => tracing::warn!("fault injection: cannot forge records: {e}"),
            }
        }
    }
}

/// Publishes one round of bad records (see [`Fault::ForgeRecords`]).
#[cfg(feature = "fault-injection")]
async fn forge_records(
    node: &crate::serve::ServingNode,
    data_dir: &crate::datadir::DataDir,
) -> Result<usize, crate::serve::JoinError> {
    use nakshatra_swarm::protocol::{encode, keys, now_ms, SignedServerInfo};
    let me = node.swarm.peer_id();
    let my_key = nakshatra_swarm::signing_key(&crate::serve::load_identity(data_dir)?)?;
    let stranger =
        nakshatra_swarm::signing_key(&nakshatra_swarm::IdentityKeypair::generate_ed25519())?;
    let victims: Vec<_> = node
        .swarm
        .connected_peers()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|p| *p != me)
        .collect();
    let now = now_ms();
    let mut lie = node.info.clone();
    lie.start = 0;
    lie.end = lie.n_layers_total;
    lie.throughput = 1e9;
    lie.issued_at_ms = now;
    lie.expires_at_ms = now + 60_000;
    let payload = encode(&lie).unwrap_or_default();
    let version = lie.protocol_version;
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for v in &victims {
        let key = keys::info_key(v);
        // A stranger's signature over a claim about the victim.
        records.push((
            key.clone(),
            SignedServerInfo::sign_raw(&stranger, version, payload.clone()).to_bytes(),
        ));
        // Our own valid signature, then one payload byte changed.
        let mut t = SignedServerInfo::sign_raw(&my_key, version, payload.clone());
        if let Some(b) = t.payload.last_mut() {
            *b ^= 0x5a;
        }
        records.push((key.clone(), t.to_bytes()));
        records.push((key.clone(), vec![0xab; 20 * 1024]));
        records.push((key, b"not a record at all".to_vec()));
    }
    // An expired record of our own, validly signed.
    let mut old = lie.clone();
    old.issued_at_ms = now.saturating_sub(600_000);
    old.expires_at_ms = now.saturating_sub(300_000);
    let old = encode(&old).unwrap_or_default();
    records.push((
        keys::info_key(&me),
        SignedServerInfo::sign_raw(&my_key, version, old).to_bytes(),
    ));
    let n = records.len();
    for (k, v) in records {
        let _ = node.swarm.put_raw_record(&k, v).await;
    }
    Ok(n)
}
