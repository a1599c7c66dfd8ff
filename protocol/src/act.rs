//! The activation protocol: how an asker sets up a chain of hops and how
//! hidden states are pushed hop to hop.
//!
//! Streams (libp2p, one per session per hop):
//!
//! * [`ACT_PROTOCOL`] — asker → hop 1 → hop 2 → ... → last hop. The first
//!   frame is [`ActFrame::Open`]; each hop opens its own stream to the next
//!   hop with the same `Open` (index + 1). Then [`ActFrame::Step`] frames
//!   flow downstream (tokens into hop 1, hidden states between hops) and
//!   [`ActFrame::Close`] ends the session. Upstream, each stream carries
//!   [`ActReply::Ready`] once the rest of the chain is set up, or
//!   [`ActReply::Failed`]: a [`FailureReport`] signed by the hop that saw
//!   the failure, blaming itself or its next hop.
//! * [`TOKENS_PROTOCOL`] — last hop → asker (over the connection the asker
//!   already has to it): [`TokenFrame::Hello`] naming the session, then
//!   per step its [`TokenFrame::Token`]s followed by as many
//!   [`TokenFrame::Digest`]s, or [`TokenFrame::Failed`].
//! * [`RING_PROTOCOL`] — last hop → hop 1, for a session opened with a
//!   [`Ring`]: [`RingHello`] naming the session, then one
//!   [`ActFrame::Step`] per token the last hop sampled, which hop 1 runs as
//!   the asker's next step would be (see [`Ring`]).
//! * [`VOCAB_PROTOCOL`] — asker → any serving node: [`VocabRequest`] →
//!   [`VocabResponse`] (the vocabulary-only GGUF, checked by the asker
//!   against the model id).
//!
//! Every frame is `u32 LE header length, header (bincode), u32 LE payload
//! length, payload`. Headers are small and capped at [`MAX_HEADER_BYTES`];
//! the payload carries raw hidden states (row-major, little endian, f32 or
//! f16 per [`WireDtype`]) or token ids (i32 LE), capped at
//! [`MAX_PAYLOAD_BYTES`]. Keeping the payload out of bincode avoids a
//! per-element encode on the hot path.

use serde::{Deserialize, Serialize};

/// Activation stream protocol id.
pub const ACT_PROTOCOL: &str = "/nakshatra/act/6";
/// Token return stream protocol id.
pub const TOKENS_PROTOCOL: &str = "/nakshatra/tokens/4";
/// Ring stream protocol id (last hop → hop 1, see [`Ring`]).
pub const RING_PROTOCOL: &str = "/nakshatra/ring/1";
/// Vocabulary fetch protocol id.
pub const VOCAB_PROTOCOL: &str = "/nakshatra/vocab/1";

/// Largest frame header accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest frame payload accepted (a prefill of 8192 tokens × 8192 wide
/// f32 is 256 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024 * 1024;
/// Most hops a chain may have.
pub const MAX_HOPS: usize = 64;
/// Most drafted tokens one step may carry ([`StepHeader::draft`]): far
/// past where speculation pays (a verify of 33 rows), and small enough
/// that the logits rows a last hop keeps for a step stay bounded
/// (`(MAX_DRAFT + 1) × n_vocab` floats).
pub const MAX_DRAFT: usize = 32;

/// Most end-of-generation tokens a [`Ring`] may name (models have a few:
/// `<|im_end|>`, `<|endoftext|>`, `<eos>`, ...).
pub const MAX_RING_EOG: usize = 64;

/// The ring: the chain decodes by itself. After each step the asker marked
/// [`StepHeader::ring`], the last hop sends the token it sampled straight
/// to hop 1 on a [`RING_PROTOCOL`] stream, as the next one-token step
/// (step + 1, at the position after the step's), before it streams the
/// token to the asker; hop 1 runs it as it would the asker's. A token then
/// costs the hops' links only: the asker's link to hop 1 carries the
/// prefill and `Close`, and its token stream is off the decode's path.
/// The last hop stops feeding where the asker would stop asking: after an
/// end-of-generation token, once `max_steps` steps ran, or at the context
/// limit; the asker sends `Close` for anything else (a stop string). The
/// only hop of a one-hop chain feeds itself, without a stream. Steps the
/// asker drives itself (a resumed chain's replay, drafts, `--verify`'s
/// replica and replays) do not ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// Steps in all, the prefill included (the asker's `max_tokens`): no
    /// step `max_steps` or later is fed.
    pub max_steps: u64,
    /// Context limit: a step whose input would sit at `max_pos` or past it
    /// is not fed.
    pub max_pos: u32,
    /// The model's end-of-generation tokens (at most [`MAX_RING_EOG`]): a
    /// token among them ends the generation.
    pub eog: Vec<i32>,
}

/// First frame on a [`RING_PROTOCOL`] stream: which session it feeds. Hop
/// 1 takes the stream only from the peer the session's chain names as its
/// last hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingHello {
    /// The session's asker (base58 peer id): sessions are keyed by asker
    /// and id.
    pub asker: String,
    /// The session id ([`OpenSession::session`]).
    pub session: u64,
}

/// Encoding of hidden states on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WireDtype {
    /// 32-bit floats: exact.
    #[default]
    F32,
    /// 16-bit floats: half the bytes, not exact.
    F16,
}

impl WireDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 => 2,
        }
    }
}

/// Sampling parameters the last hop applies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; 0 or less: greedy (always the most likely
    /// token, no randomness).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens before drawing; 0 or less:
    /// off.
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// sums to at least `top_p`; 1.0 or more: off.
    pub top_p: f32,
    /// Seed of the random draw (unused when greedy): the same seed, prompt
    /// and chain give the same tokens.
    pub seed: u32,
}

/// One hop of a chain as the asker planned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopSpec {
    /// The hop's peer id (base58).
    pub peer_id: String,
    /// First block it runs (inclusive).
    pub start: u32,
    /// One past its last block (exclusive); the next hop starts here.
    pub end: u32,
    /// Addresses to reach it (multiaddr strings).
    pub addrs: Vec<String>,
}

/// Sets up a session on a hop and, through it, on the rest of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenSession {
    /// Random session id chosen by the asker. A chain that replaces a
    /// broken one keeps the session id: a hop that still holds the
    /// session from the broken chain (same asker, same range, same
    /// sampling) resumes it with its KV cache and history instead of
    /// opening a fresh one.
    pub session: u64,
    /// Model id (64 hex).
    pub model_id: String,
    /// The whole chain, in order.
    pub hops: Vec<HopSpec>,
    /// Index of the hop this frame is sent to.
    pub index: u32,
    /// Sampling for the last hop.
    pub sampling: Sampling,
    /// Hidden-state encoding between hops.
    pub wire: WireDtype,
    /// Peer id of the asker (the last hop streams tokens to it).
    pub asker: String,
    /// Whether the hops open the chain's next links (to the next hop, and
    /// the last hop's tokens to the asker) as direct streams where they
    /// can (`nakshatra_swarm::stream::direct`: a TCP connection of the
    /// link's own, noise, no yamux), or always as libp2p streams
    /// (`node ask --no-direct`). The bytes on the link are the same.
    pub direct: bool,
    /// The chain decodes by itself (see [`Ring`]); `None`: every step
    /// comes from the asker (`node ask --no-ring`, drafts).
    /// A one-hop chain's hop feeds itself.
    pub ring: Option<Ring>,
}

/// What a step's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    /// Token ids, i32 little endian.
    Tokens,
    /// Hidden states, `n_tokens × n_embd` in the session's wire dtype.
    Hidden,
}

/// One step of a session: positions `pos .. pos + n_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepHeader {
    /// Step number: 0 is the prefill, then one per decoded token.
    pub step: u64,
    /// Position of the first token. A hop whose session is longer drops
    /// what is past `pos` first, so a retried step is never applied twice.
    pub pos: u32,
    /// Positions the step covers (the whole prompt for a prefill, 1 for a
    /// decode step); the payload holds this many rows.
    pub n_tokens: u32,
    /// Whether the payload holds token ids (sent to the first hop) or
    /// hidden states (sent to every later hop).
    pub kind: StepKind,
    /// Engine time spent on this step by the hops so far, microseconds.
    pub compute_us: u64,
    /// Speculative decoding: the tokens the asker's draft model proposed,
    /// which are the step's last `draft.len()` input tokens (at most
    /// [`MAX_DRAFT`], fewer than `n_tokens`; empty for a plain step). The
    /// last hop samples the token of every drafted position and of the
    /// one before (step `step`, `step + 1`, ...) as one-token steps
    /// would, and stops at the first sample that differs from the draft:
    /// it streams back the accepted drafts and that sample (one
    /// [`TokenFrame::Token`] each). The rows past it are dropped by the
    /// next step, which starts after the last accepted position.
    pub draft: Vec<i32>,
    /// The last hop feeds this step's token to hop 1 as the next step (a
    /// session with a [`Ring`], a step without drafts). Carried down the
    /// chain with the step.
    pub ring: bool,
}

impl StepHeader {
    /// Rows of logits the last hop samples for this step: the drafted
    /// positions and the one before them.
    pub fn rows(&self) -> usize {
        self.draft.len() + 1
    }

    /// Whether the draft fits the step: at most [`MAX_DRAFT`] tokens,
    /// fewer than the step's positions.
    pub fn draft_fits(&self) -> bool {
        self.draft.len() <= MAX_DRAFT && self.draft.len() < self.n_tokens as usize
    }
}

/// Downstream frames on an activation stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ActFrame {
    /// Set up the session (first frame).
    Open(OpenSession),
    /// One step (payload follows).
    Step(StepHeader),
    /// End the session and free its KV cache.
    Close,
}

/// Upstream frames on an activation stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActReply {
    /// Every hop from this one to the last has its session open.
    Ready {
        /// For each hop from this one to the last, in order: how many
        /// positions of the session it kept from an earlier chain of the
        /// same session (0: a fresh session). A hop that kept positions
        /// answers steps inside them from its history, without computing
        /// (see [`OpenSession::session`]). At most [`MAX_HOPS`] entries.
        kept: Vec<u32>,
        /// The last hop opened its ring stream to hop 1 (a session with
        /// [`OpenSession::ring`]): the chain can feed itself. `false`: the
        /// asker sends every step (no ring asked for, or the last hop
        /// could not reach hop 1).
        ring: bool,
    },
    /// A hop failed (at open or later), in a report signed by the hop that
    /// saw it; hops upstream relay it unchanged.
    Failed(FailureReport),
}

/// A failure as one hop saw it, signed with that hop's libp2p key so that
/// the hops relaying it upstream cannot forge or alter it.
///
/// A hop can show only what happened to itself or on its own link to the
/// next hop, so `blamed` is the reporter or the hop after it
/// ([`FailureReport::check`]); the asker counts a failure blamed on the
/// next hop against both, since the reporter cannot prove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    /// The session ([`OpenSession::session`]).
    pub session: u64,
    /// Index of the hop that signed the report.
    pub reporter: u32,
    /// Index of the hop the reporter blames: itself or the next hop.
    pub blamed: u32,
    /// Not a fault: the blamed hop has no session for this asker now (its
    /// slots, or the asker's share of them, are taken). The asker waits
    /// and tries again rather than planning around it.
    pub busy: bool,
    /// Why, for people.
    pub message: String,
    /// ed25519 signature over [`FailureReport::signed_bytes`] by the
    /// reporter's libp2p key.
    pub signature: Vec<u8>,
}

/// Why a [`FailureReport`] cannot be taken at its word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// It is for another session.
    #[error("report for session {got}, not {want}")]
    OtherSession {
        /// The session it names.
        got: u64,
        /// The session it should name.
        want: u64,
    },
    /// The reporter is not in the chain.
    #[error("reporter {0} is not a hop of the chain")]
    NoSuchReporter(u32),
    /// The reporter blames a hop it cannot see (not itself, not its next).
    #[error("hop {reporter} blames hop {blamed}, which it cannot show")]
    BlamesTooFar {
        /// The reporter.
        reporter: u32,
        /// The hop it blames.
        blamed: u32,
    },
    /// The reporter's peer id carries no ed25519 key.
    #[error("hop {0}'s peer id carries no ed25519 key")]
    NoKey(u32),
    /// The signature is not the reporter's.
    #[error("the report is not signed by hop {0}")]
    BadSignature(u32),
}

/// Domain separation for [`FailureReport`] signatures.
const REPORT_CONTEXT: &[u8] = b"nakshatra/failure-report/1";

impl FailureReport {
    /// A report by hop `reporter` of `session`, blaming `blamed`, signed
    /// with `key` (the reporter's libp2p identity).
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        session: u64,
        reporter: u32,
        blamed: u32,
        message: String,
    ) -> Self {
        Self::sign_kind(key, session, reporter, blamed, false, message)
    }

    /// [`FailureReport::sign`] of a report that may say "busy".
    pub fn sign_kind(
        key: &ed25519_dalek::SigningKey,
        session: u64,
        reporter: u32,
        blamed: u32,
        busy: bool,
        message: String,
    ) -> Self {
        use ed25519_dalek::Signer;
        let mut r = FailureReport {
            session,
            reporter,
            blamed,
            busy,
            message,
            signature: Vec::new(),
        };
        r.signature = key.sign(&r.signed_bytes()).to_bytes().to_vec();
        r
    }

    /// What the signature covers: a context string, then session,
    /// reporter, blamed (little endian), busy (one byte) and the message.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REPORT_CONTEXT.len() + 16 + self.message.len());
        b.extend_from_slice(REPORT_CONTEXT);
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&self.reporter.to_le_bytes());
        b.extend_from_slice(&self.blamed.to_le_bytes());
        b.push(u8::from(self.busy));
        b.extend_from_slice(self.message.as_bytes());
        b
    }

    /// Checks the report against the chain of `session`: the reporter is a
    /// hop, it blames itself or its next hop (hop 1 also the last hop,
    /// which feeds it in a [`Ring`]), and the signature is the key
    /// of the reporter's peer id.
    pub fn check(&self, session: u64, hops: &[HopSpec]) -> Result<(), ReportError> {
        if self.session != session {
            return Err(ReportError::OtherSession {
                got: self.session,
                want: session,
            });
        }
        let reporter = hops
            .get(self.reporter as usize)
            .ok_or(ReportError::NoSuchReporter(self.reporter))?;
        // Hop 1 also takes the last hop's ring stream (see [`Ring`]): it
        // may blame the last hop for what came on it.
        let blamed_ok = self.blamed == self.reporter
            || (self.blamed == self.reporter.saturating_add(1)
                && (self.blamed as usize) < hops.len())
            || (self.reporter == 0 && self.blamed as usize + 1 == hops.len());
        if !blamed_ok {
            return Err(ReportError::BlamesTooFar {
                reporter: self.reporter,
                blamed: self.blamed,
            });
        }
        let key = reporter
            .peer_id
            .parse::<libp2p_identity::PeerId>()
            .ok()
            .and_then(|p| crate::record::ed25519_key_of(&p))
            .ok_or(ReportError::NoKey(self.reporter))?;
        let sig = ed25519_dalek::Signature::from_slice(&self.signature)
            .map_err(|_| ReportError::BadSignature(self.reporter))?;
        key.verify_strict(&self.signed_bytes(), &sig)
            .map_err(|_| ReportError::BadSignature(self.reporter))
    }
}

/// Frames on the token return stream (last hop → asker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TokenFrame {
    /// First frame: which session this stream serves.
    Hello {
        /// The session id the asker chose ([`OpenSession::session`]).
        session: u64,
    },
    /// A token sampled in a step: the step's one token, or one of a
    /// speculative step's accepted tokens (see [`StepHeader::draft`]).
    Token {
        /// The token's own step number: the step ([`StepHeader::step`])
        /// plus its index among the tokens that step accepted.
        step: u64,
        /// Sampled token id.
        token: i32,
        /// Engine time of all hops on this step, microseconds.
        compute_us: u64,
    },
    /// The logits digest of a token already sent: after a step's tokens,
    /// one per token, in their order (so before the next step's first
    /// token). Sent after the tokens, not with them, so that hashing the
    /// logits (~50 µs for a 49,152-token vocabulary) is off the step's
    /// path: the asker starts its next step meanwhile.
    Digest {
        /// The step of the token it belongs to.
        step: u64,
        /// BLAKE3 of the logits the token was sampled from (f32, little
        /// endian): what `--verify` compares with a replica chain's.
        /// Sent for every token, so a hop cannot tell which steps are
        /// checked.
        digest: [u8; 32],
    },
    /// The last hop failed.
    Failed {
        /// Why the last hop failed, for people; the stream ends after it.
        message: String,
    },
}

/// Asks for a model's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabRequest {
    /// Model id (64 hex).
    pub model_id: String,
}

/// The answer to a [`VocabRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VocabResponse {
    /// The vocabulary-only GGUF is the payload; `hashes` (bincode of the
    /// slicer's `ModelHashes`) let the asker recompute the model id.
    Vocab {
        /// Encoded hashes of the model's tensor groups.
        hashes: Vec<u8>,
    },
    /// This node does not have it.
    NotHere,
}

/// Little-endian bytes of token ids.
pub fn tokens_to_bytes(tokens: &[i32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Token ids from little-endian bytes (`None` unless a whole number).
pub fn tokens_from_bytes(b: &[u8]) -> Option<Vec<i32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(key: &ed25519_dalek::SigningKey) -> HopSpec {
        let peer = crate::peer_id_of(&key.verifying_key().to_bytes()).unwrap();
        HopSpec {
            peer_id: peer.to_string(),
            start: 0,
            end: 1,
            addrs: vec![],
        }
    }

    #[test]
    fn failure_reports_name_only_what_the_reporter_can_show() {
        let keys: Vec<_> = (1..=4u8)
            .map(|i| ed25519_dalek::SigningKey::from_bytes(&[i; 32]))
            .collect();
        let hops: Vec<HopSpec> = keys.iter().map(hop).collect();
        let own = FailureReport::sign(&keys[1], 9, 1, 1, "engine refused".into());
        assert_eq!(own.check(9, &hops), Ok(()));
        let next = FailureReport::sign(&keys[1], 9, 1, 2, "next hop gone".into());
        assert_eq!(next.check(9, &hops), Ok(()));
        // Hop 0 blaming hop 2 (which it never talks to) is refused...
        let far = FailureReport::sign(&keys[0], 9, 0, 2, "hop 2 died".into());
        assert_eq!(
            far.check(9, &hops),
            Err(ReportError::BlamesTooFar {
                reporter: 0,
                blamed: 2
            })
        );
        // Hop 0 may blame the last hop (it feeds hop 0 in a ring), no
        // other hop may.
        let ring = FailureReport::sign(&keys[0], 9, 0, 3, "bad ring step".into());
        assert_eq!(ring.check(9, &hops), Ok(()));
        let not_first = FailureReport::sign(&keys[1], 9, 1, 3, "x".into());
        assert_eq!(
            not_first.check(9, &hops),
            Err(ReportError::BlamesTooFar {
                reporter: 1,
                blamed: 3
            })
        );
        // ...and so is hop 0 signing in hop 1's name, or a changed message,
        // another session, a reporter past the chain, blame past its end.
        let forged = FailureReport::sign(&keys[0], 9, 1, 2, "hop 2 died".into());
        assert_eq!(forged.check(9, &hops), Err(ReportError::BadSignature(1)));
        let mut altered = own.clone();
        altered.message = "something else".into();
        assert_eq!(altered.check(9, &hops), Err(ReportError::BadSignature(1)));
        assert!(matches!(
            own.check(10, &hops),
            Err(ReportError::OtherSession { .. })
        ));
        let past = FailureReport::sign(&keys[3], 9, 4, 4, "x".into());
        assert_eq!(past.check(9, &hops), Err(ReportError::NoSuchReporter(4)));
        let off_end = FailureReport::sign(&keys[3], 9, 3, 4, "x".into());
        assert!(matches!(
            off_end.check(9, &hops),
            Err(ReportError::BlamesTooFar { .. })
        ));
    }

    #[test]
    fn token_bytes_round_trip() {
        let t = vec![0, 1, -1, i32::MAX, 49151];
        assert_eq!(tokens_from_bytes(&tokens_to_bytes(&t)), Some(t));
        assert_eq!(tokens_from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let open = ActFrame::Open(OpenSession {
            session: 7,
            model_id: "ab".repeat(32),
            hops: vec![HopSpec {
                peer_id: "p".into(),
                start: 0,
                end: 10,
                addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            }],
            index: 0,
            sampling: Sampling {
                temperature: 0.0,
                top_k: 40,
                top_p: 0.95,
                seed: 1,
            },
            wire: WireDtype::F16,
            direct: true,
            asker: "a".into(),
            ring: Some(Ring {
                max_steps: 64,
                max_pos: 4096,
                eog: vec![2, 49152],
            }),
        });
        let b = crate::encode(&open).unwrap();
        assert_eq!(
            crate::decode::<ActFrame>(&b, MAX_HEADER_BYTES).unwrap(),
            open
        );
        for cut in 0..b.len() {
            assert!(crate::decode::<ActFrame>(&b[..cut], MAX_HEADER_BYTES).is_err());
        }
        assert!(crate::decode::<ActFrame>(&[0xff; 32], MAX_HEADER_BYTES).is_err());
    }
}
