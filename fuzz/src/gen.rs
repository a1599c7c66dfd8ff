//! Arbitrary but well-formed protocol messages, built from random bytes:
//! their encodings are the seeds the mutations start from, so inputs
//! reach past the first field of every message type.

use arbitrary::{Result, Unstructured};
use ed25519_dalek::SigningKey;
use nakshatra_swarm::protocol::act::{
    ActFrame, ActReply, FailureReport, HopSpec, OpenSession, Ring, Sampling, StepHeader, StepKind,
    TokenFrame, VocabRequest, VocabResponse, WireDtype,
};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, PieceRef, PieceRequest, PieceResponse, SignedBlob,
    MANIFEST_DOMAIN,
};
use nakshatra_swarm::protocol::rpc::{InfoRequest, InfoResponse};
use nakshatra_swarm::protocol::{
    encode, keys, peer_id_of, DeviceInfo, NextRtt, ServerInfo, ServerState, PROTOCOL_VERSION,
};

/// A fixed signing key (`n` picks one of a few).
pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n.wrapping_add(1); 32])
}

/// The base58 peer id of [`key`]`(n)`.
pub fn peer_id(n: u8) -> String {
    peer_id_of(&key(n).verifying_key().to_bytes())
        .map(|p| p.to_string())
        .unwrap_or_default()
}

/// A valid model id (64 lowercase hex).
pub fn model_id(u: &mut Unstructured<'_>) -> Result<String> {
    let b: [u8; 32] = u.arbitrary()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Short text: a peer id, a model id, an address, or arbitrary UTF-8.
pub fn text(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => peer_id(u.int_in_range(0..=3)?),
        1 => model_id(u)?,
        2 => format!("/ip4/127.0.0.1/tcp/{}", u.arbitrary::<u16>()?),
        _ => {
            let s: String = u.arbitrary()?;
            s.chars().take(40).collect()
        }
    })
}

/// Up to `max` items from `f`.
fn list<T>(
    u: &mut Unstructured<'_>,
    max: usize,
    mut f: impl FnMut(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| f(u)).collect()
}

/// Small integers most of the time, any value sometimes.
fn num<T: for<'a> arbitrary::Arbitrary<'a> + From<u8>>(u: &mut Unstructured<'_>) -> Result<T> {
    if u.ratio(3, 4)? {
        Ok(T::from(u.int_in_range(0..=64u8)?))
    } else {
        u.arbitrary()
    }
}

/// An [`OpenSession`].
pub fn open_session(u: &mut Unstructured<'_>) -> Result<OpenSession> {
    Ok(OpenSession {
        session: u.arbitrary()?,
        model_id: model_id(u)?,
        hops: list(u, 4, |u| {
            Ok(HopSpec {
                peer_id: text(u)?,
                start: num(u)?,
                end: num(u)?,
                addrs: list(u, 3, text)?,
            })
        })?,
        index: num(u)?,
        sampling: Sampling {
            temperature: u.arbitrary()?,
            top_k: u.arbitrary()?,
            top_p: u.arbitrary()?,
            seed: u.arbitrary()?,
        },
        direct: u.arbitrary()?,
        wire: if u.arbitrary()? {
            WireDtype::F16
        } else {
            WireDtype::F32
        },
        asker: text(u)?,
        ring: if u.arbitrary()? {
            Some(Ring {
                max_steps: num(u)?,
                max_pos: num(u)?,
                eog: list(u, 3, num)?,
            })
        } else {
            None
        },
    })
}

/// A [`StepHeader`].
pub fn step_header(u: &mut Unstructured<'_>) -> Result<StepHeader> {
    Ok(StepHeader {
        step: num(u)?,
        pos: num(u)?,
        n_tokens: num(u)?,
        kind: if u.arbitrary()? {
            StepKind::Hidden
        } else {
            StepKind::Tokens
        },
        compute_us: num(u)?,
        draft: {
            let n = u.int_in_range(0..=3u8)?;
            (0..n).map(|_| num(u)).collect::<Result<_>>()?
        },
        ring: u.arbitrary()?,
    })
}

/// An [`ActFrame`].
pub fn act_frame(u: &mut Unstructured<'_>) -> Result<ActFrame> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => ActFrame::Open(open_session(u)?),
        1 => ActFrame::Step(step_header(u)?),
        _ => ActFrame::Close,
    })
}

/// An [`ActReply`].
pub fn act_reply(u: &mut Unstructured<'_>) -> Result<ActReply> {
    Ok(if u.arbitrary()? {
        let n = u.int_in_range(0..=4usize)?;
        let kept = (0..n)
            .map(|_| u.arbitrary())
            .collect::<Result<Vec<u32>>>()?;
        ActReply::Ready {
            kept,
            ring: u.arbitrary()?,
        }
    } else {
        ActReply::Failed(failure_report(u)?)
    })
}

/// A [`FailureReport`] signed by one of the fixed keys.
pub fn failure_report(u: &mut Unstructured<'_>) -> Result<FailureReport> {
    let reporter = u.int_in_range(0..=4u32)?;
    Ok(FailureReport::sign(
        &key(u.int_in_range(0..=3)?),
        u.arbitrary()?,
        reporter,
        reporter + u.int_in_range(0..=1u32)?,
        text(u)?,
    ))
}

/// A [`TokenFrame`].
pub fn token_frame(u: &mut Unstructured<'_>) -> Result<TokenFrame> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => TokenFrame::Hello {
            session: u.arbitrary()?,
        },
        1 => TokenFrame::Token {
            step: num(u)?,
            token: u.arbitrary()?,
            compute_us: num(u)?,
        },
        2 => TokenFrame::Digest {
            step: num(u)?,
            digest: u.arbitrary()?,
        },
        _ => TokenFrame::Failed { message: text(u)? },
    })
}

/// A [`VocabRequest`].
pub fn vocab_request(u: &mut Unstructured<'_>) -> Result<VocabRequest> {
    Ok(VocabRequest {
        model_id: model_id(u)?,
    })
}

/// A [`VocabResponse`].
pub fn vocab_response(u: &mut Unstructured<'_>) -> Result<VocabResponse> {
    Ok(if u.arbitrary()? {
        VocabResponse::NotHere
    } else {
        let n = u.int_in_range(0..=64usize)?;
        VocabResponse::Vocab {
            hashes: u.bytes(n.min(u.len()))?.to_vec(),
        }
    })
}

/// A [`PieceRef`].
pub fn piece_ref(u: &mut Unstructured<'_>) -> Result<PieceRef> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => PieceRef::Block(num(u)?),
        1 => PieceRef::Embd,
        2 => PieceRef::Head,
        _ => PieceRef::Globals,
    })
}

/// A [`ManifestRequest`].
pub fn manifest_request(u: &mut Unstructured<'_>) -> Result<ManifestRequest> {
    Ok(ManifestRequest {
        model_id: model_id(u)?,
    })
}

/// A [`ManifestResponse`].
pub fn manifest_response(u: &mut Unstructured<'_>) -> Result<ManifestResponse> {
    Ok(if u.arbitrary()? {
        ManifestResponse::Manifest
    } else {
        ManifestResponse::NotHere
    })
}

/// A [`PieceRequest`].
pub fn piece_request(u: &mut Unstructured<'_>) -> Result<PieceRequest> {
    Ok(PieceRequest {
        model_id: model_id(u)?,
        piece: piece_ref(u)?,
        offset: num(u)?,
        len: num(u)?,
    })
}

/// A [`PieceResponse`].
pub fn piece_response(u: &mut Unstructured<'_>) -> Result<PieceResponse> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => PieceResponse::Data { total: num(u)? },
        1 => PieceResponse::NotHere,
        _ => PieceResponse::Error { message: text(u)? },
    })
}

/// A [`SignedBlob`] of the manifest domain (or another) over `payload`,
/// signed by one of the fixed keys.
pub fn signed_blob(u: &mut Unstructured<'_>, payload: Vec<u8>) -> Result<SignedBlob> {
    let domain = if u.ratio(7, 8)? {
        MANIFEST_DOMAIN.to_string()
    } else {
        text(u)?
    };
    Ok(SignedBlob::sign(
        &key(u.int_in_range(0..=3)?),
        &domain,
        payload,
    ))
}

/// A [`ServerInfo`] that passes `validate` (most of the time; some fields
/// are pushed to their limits), issued at `now_ms`.
pub fn server_info(u: &mut Unstructured<'_>, now_ms: u64) -> Result<ServerInfo> {
    let n_layers_total = u.int_in_range(1..=64u32)?;
    let start = u.int_in_range(0..=n_layers_total - 1)?;
    let end = u.int_in_range(start + 1..=n_layers_total)?;
    let max_sessions = u.int_in_range(0..=64)?;
    Ok(ServerInfo {
        protocol_version: PROTOCOL_VERSION,
        model_id: model_id(u)?,
        arch: "llama".into(),
        n_layers_total,
        start,
        end,
        n_embd: u.int_in_range(1..=8192)?,
        devices: list(u, 3, |u| {
            Ok(DeviceInfo {
                name: "cpu".into(),
                backend: "CPU".into(),
                description: text(u)?.chars().filter(|c| !c.is_control()).collect(),
                memory_total: u.arbitrary()?,
                memory_free: u.arbitrary()?,
                features: list(u, 4, |u| {
                    Ok(text(u)?.chars().filter(|c| !c.is_control()).collect())
                })?,
            })
        })?,
        throughput: f64::from(u.int_in_range(0..=1000u16)?),
        free_sessions: 0,
        max_sessions,
        context_per_session: u.int_in_range(0..=8192)?,
        state: *u.choose(&[
            ServerState::Joining,
            ServerState::Online,
            ServerState::Offline,
        ])?,
        listen_addrs: list(u, 4, |u| {
            Ok(format!("/ip4/10.0.0.1/tcp/{}", u.arbitrary::<u16>()?))
        })?,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms + u.int_in_range(1..=3_600_000)?,
        next_rtts: list(u, 3, |u| {
            Ok(NextRtt {
                peer_id: peer_id(u.int_in_range(0..=3)?),
                rtt_ms: f32::from(u.int_in_range(0..=500u16)?),
            })
        })?,
        model_name: u
            .choose(&["", "smollm2:135m-q4_1", "gemma-3:270m-q4_k_m", "x"])?
            .to_string(),
    })
}

/// An [`InfoRequest`].
pub fn info_request(u: &mut Unstructured<'_>) -> Result<InfoRequest> {
    Ok(InfoRequest {
        version: if u.ratio(3, 4)? {
            PROTOCOL_VERSION
        } else {
            u.arbitrary()?
        },
    })
}

/// A DHT key: any of the four kinds, well formed.
pub fn dht_key(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => keys::MODELS_KEY.to_string(),
        1 => keys::model_key(&model_id(u)?),
        2 => keys::block_key(&model_id(u)?, u.int_in_range(0..=5000)?),
        _ => {
            let id = key(u.int_in_range(0..=3)?).verifying_key().to_bytes();
            match peer_id_of(&id) {
                Ok(p) => keys::info_key(&p),
                Err(_) => keys::MODELS_KEY.to_string(),
            }
        }
    })
}

/// The encoding of `value` (the protocol's bincode), for seeds.
pub fn bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    encode(value).expect("protocol types encode")
}

/// An [`InfoResponse`] around `record` bytes, or `NotServing`.
pub fn info_response(u: &mut Unstructured<'_>, record: Vec<u8>) -> Result<InfoResponse> {
    Ok(if u.ratio(1, 5)? {
        InfoResponse::NotServing
    } else {
        InfoResponse::Serving(record)
    })
}
