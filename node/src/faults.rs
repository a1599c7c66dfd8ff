//! Test-only fault injection, all of it in this file.
//!
//! The e2e tests need nodes that misbehave: a slow link (this sandbox has
//! no netem), a peer that serves corrupt pieces, one that announces
//! pieces but stalls or trickles them, a peer that publishes forged DHT
//! records, one that lies about the model's layer count. That code exists only with the `fault-injection`
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
    /// Set once a [`Fault::BreakNextLink`] node broke a link (it breaks
    /// one, once: the replacement chain must get through).
    #[cfg(feature = "fault-injection")]
    pub broke_link: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    /// Announce a decode throughput far above the real one
    /// ([`OVERCLAIMED_TPS`]) and take [`OVERCLAIM_STEP_DELAY`] more per
    /// step: a hop that promises much and delivers little (its probe
    /// echoes stay fast, so only measuring its steps shows it).
    Overclaim,
    /// Return wrong results: every step's output (hidden states or
    /// logits) has its first value raised by [`CORRUPTION`]; announce
    /// [`OVERCLAIMED_TPS`] too, to be planned.
    CorruptOutput,
    /// At the prefill step, report upstream that the next hop failed,
    /// in a report signed in the next hop's name by a stranger's key, and
    /// drop the session; announce [`OVERCLAIMED_TPS`] too, to be planned.
    ForgeBlame,
    /// Announce the model and serve the vocabulary, but never answer a
    /// manifest or piece request: read them, keep the stream open, say
    /// nothing (a Sybil provider that holds fetchers up).
    Stall,
    /// Serve pieces correctly but [`TRICKLE_BYTES`] every
    /// [`TRICKLE_EVERY`] (a provider slow enough to hold a piece for a
    /// minute, never silent long enough to look dead).
    TricklePieces,
    /// Announce the model as [`LIE_LAYERS`] layers (this node's range
    /// clipped to them), whatever the model really has.
    LieLayers,
    /// At step [`BREAK_LINK_STEP`] of its first session that gets there,
    /// drop the stream to the next hop and report upstream, truthfully
    /// signed, that it ended (a link that broke while both hops live on,
    /// as a relayed connection closing under a chain did).
    BreakNextLink,
    /// As the last hop of a ring, feed hop 1 every step at the position
    /// before the one it belongs at (a last hop that would roll hop 1's
    /// cache back); announce [`OVERCLAIMED_TPS`] too, to be planned.
    RewindRing,
    /// As the last hop of a ring, never open the ring stream to hop 1 (as
    /// when hop 1 is unreachable from it): its `Ready` says the ring is
    /// not up.
    NoRing,
}

/// The step at which a [`Fault::BreakNextLink`] node breaks its link to
/// the next hop (a decode step: the answer is under way).
#[cfg(feature = "fault-injection")]
pub const BREAK_LINK_STEP: u64 = 8;

/// With [`Fault::TricklePieces`], bytes sent at a time...
#[cfg(feature = "fault-injection")]
pub const TRICKLE_BYTES: usize = 4096;
/// ... and the pause after each (40 KiB/s: a 2 MiB chunk takes 51 s).
#[cfg(feature = "fault-injection")]
pub const TRICKLE_EVERY: Duration = Duration::from_millis(100);
/// The layer count a [`Fault::LieLayers`] node announces.
#[cfg(feature = "fault-injection")]
pub const LIE_LAYERS: u32 = 10;

/// The throughput a node with [`Fault::Overclaim`] announces, tokens/s:
/// plausible for a small slice on a fast GPU, far above any slice here.
#[cfg(feature = "fault-injection")]
pub const OVERCLAIMED_TPS: f64 = 20_000.0;
/// What a node with [`Fault::CorruptOutput`] adds to the first value of
/// each output (large enough to change a greedy answer).
#[cfg(feature = "fault-injection")]
pub const CORRUPTION: f32 = 64.0;
/// What a node with [`Fault::Overclaim`] adds to each step it runs.
#[cfg(feature = "fault-injection")]
pub const OVERCLAIM_STEP_DELAY: Duration = Duration::from_millis(150);

impl Faults {
    /// The throughput to announce for a measured one (a lie with
    /// [`Fault::Overclaim`]).
    pub fn announced_throughput(&self, measured: f64) -> f64 {
        #[cfg(feature = "fault-injection")]
        if matches!(
            self.fault,
            Some(Fault::Overclaim | Fault::ForgeBlame | Fault::CorruptOutput | Fault::RewindRing)
        ) {
            return OVERCLAIMED_TPS;
        }
        measured
    }

    /// With [`Fault::CorruptOutput`], corrupts a step's output in place.
    pub fn corrupt_output(&self, _out: &mut [f32]) {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::CorruptOutput) {
            if let Some(x) = _out.first_mut() {
                *x += CORRUPTION;
            }
        }
    }

    /// Waits out what [`Fault::Overclaim`] adds to a step.
    pub async fn step_delay(&self) {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::Overclaim) {
            tokio::time::sleep(OVERCLAIM_STEP_DELAY).await;
        }
    }

    /// With [`Fault::ForgeBlame`], the forged report to send upstream
    /// instead of running step `step` of session `open` (see there); else
    /// `None`.
    pub fn forged_blame(
        &self,
        _open: &nakshatra_swarm::protocol::act::OpenSession,
        _step: u64,
    ) -> Option<nakshatra_swarm::protocol::act::ActReply> {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::ForgeBlame) && _step == 0 {
            use nakshatra_swarm::protocol::act::{ActReply, FailureReport};
            let next = _open.index + 1;
            let stranger = ed25519_dalek::SigningKey::from_bytes(&rand::random());
            let message = "engine crashed (forged)".to_string();
            return Some(ActReply::Failed(FailureReport::sign(
                &stranger,
                _open.session,
                next,
                next,
                message,
            )));
        }
        None
    }

    /// The position a last hop feeds hop 1 the ring's next step at:
    /// `end`, or the one before with [`Fault::RewindRing`].
    pub fn ring_pos(&self, end: u32) -> u32 {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::RewindRing) {
            return end.saturating_sub(1);
        }
        end
    }

    /// With [`Fault::NoRing`], whether the last hop skips opening its ring
    /// stream.
    pub fn no_ring(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::NoRing) {
            return true;
        }
        false
    }

    /// With [`Fault::BreakNextLink`], whether to break the link to the
    /// next hop at step `step` (true once in the node's life).
    pub fn breaks_next_link(&self, _step: u64) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::BreakNextLink) && _step == BREAK_LINK_STEP {
            use std::sync::atomic::Ordering;
            return !self.broke_link.swap(true, Ordering::Relaxed);
        }
        false
    }

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

    /// With [`Fault::Stall`], reads whatever the peer sends on `_s` until
    /// it closes the stream, answering nothing, and returns true; else
    /// returns false at once (the stream is served as usual).
    pub async fn stall<S: futures::AsyncRead + Unpin>(&self, _s: &mut S) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::Stall) {
            use futures::AsyncReadExt;
            let mut sink = [0u8; 1024];
            while matches!(_s.read(&mut sink).await, Ok(n) if n > 0) {}
            return true;
        }
        false
    }

    /// With [`Fault::TricklePieces`], writes the frame `_header` + `_parts`
    /// (as `net::write_frame_parts` would) slowly: [`TRICKLE_BYTES`] every
    /// [`TRICKLE_EVERY`]; else `None` (the caller writes it).
    pub async fn trickle<W, H>(
        &self,
        _w: &mut W,
        _header: &H,
        _parts: &[&[u8]],
    ) -> Option<Result<(), crate::net::FrameError>>
    where
        W: futures::AsyncWrite + Unpin,
        H: serde::Serialize,
    {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::TricklePieces) {
            use futures::AsyncWriteExt;
            let mut frame = Vec::new();
            if let Err(e) = crate::net::write_frame_parts(&mut frame, _header, _parts).await {
                return Some(Err(e));
            }
            for bit in frame.chunks(TRICKLE_BYTES) {
                let sent = async {
                    _w.write_all(bit).await?;
                    _w.flush().await
                };
                if let Err(e) = sent.await {
                    return Some(Err(e.into()));
                }
                tokio::time::sleep(TRICKLE_EVERY).await;
            }
            return Some(Ok(()));
        }
        None
    }

    /// With [`Fault::LieLayers`], rewrites the info this node announces to
    /// claim a model of [`LIE_LAYERS`] layers.
    pub fn lie_about_shape(&self, _info: &mut nakshatra_swarm::ServerInfo) {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::LieLayers) {
            _info.n_layers_total = LIE_LAYERS;
            _info.end = _info.end.min(LIE_LAYERS);
            _info.start = _info.start.min(_info.end.saturating_sub(1));
        }
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
