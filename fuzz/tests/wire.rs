//! Fuzz targets: the protocol's messages (`nakshatra_protocol::decode` of
//! every activation, token, vocabulary, manifest, piece and info message),
//! signed records (`verify`), signed blobs, failure reports, DHT keys and
//! the info protocol's codec. See the crate doc for what is asserted.

use arbitrary::{Result, Unstructured};
use futures::executor::block_on;
use libp2p::request_response::Codec;
use nakshatra_fuzz::harness::DECODE_CAP;
use nakshatra_fuzz::{check, fuzz, gen, mutate, stream, Cap, Stats};
use nakshatra_swarm::protocol::act::{
    ActFrame, ActReply, FailureReport, HopSpec, OpenSession, StepHeader, TokenFrame, VocabRequest,
    VocabResponse, MAX_HEADER_BYTES,
};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, PieceRef, PieceRequest, PieceResponse, SignedBlob,
    MANIFEST_DOMAIN, MAX_MANIFEST_BYTES,
};
use nakshatra_swarm::protocol::keys::DhtKey;
use nakshatra_swarm::protocol::rpc::{
    InfoRequest, InfoResponse, INFO_PROTOCOL, MAX_INFO_REQUEST_BYTES, MAX_INFO_RESPONSE_BYTES,
};
use nakshatra_swarm::protocol::{
    decode, encode, sign, verify, PeerId, SignedServerInfo, MAX_RECORD_BYTES, PROTOCOL_VERSION,
};
use nakshatra_swarm::{InfoCodec, StreamProtocol};
use serde::{de::DeserializeOwned, Serialize};

#[global_allocator]
static ALLOC: nakshatra_fuzz::CountingAlloc = nakshatra_fuzz::CountingAlloc;

/// A fixed "now" for records (ms since the epoch), so a failing record
/// replays the same.
const NOW_MS: u64 = 1_800_000_000_000;

/// Decodes `input` as a `T` under `max` and checks the cap; a decoded
/// value must encode again and decode back.
fn decode_checked<T>(target: &str, input: &[u8], max: usize, stats: &mut Stats) -> Option<T>
where
    T: DeserializeOwned + Serialize,
{
    let (r, usage) = check(
        target,
        input,
        DECODE_CAP,
        || format!("decode::<{}>(.., {max})", std::any::type_name::<T>()),
        || decode::<T>(input, max),
    );
    stats.record(r.is_ok(), usage);
    let value = r.ok()?;
    let again = encode(&value).expect("a decoded value encodes");
    if let Err(e) = decode::<T>(&again, usize::MAX) {
        panic!(
            "{target}: decoded {}, but its own encoding does not decode ({e}); input {}",
            std::any::type_name::<T>(),
            nakshatra_fuzz::harness::hex(input)
        );
    }
    Some(value)
}

/// One message type of a family: a generator of valid values' encodings,
/// and a decode of an input under the family's cap.
type Kind = (
    fn(&mut Unstructured<'_>) -> Result<Vec<u8>>,
    fn(&[u8], &mut Stats),
);

fn seed<T: Serialize>(
    u: &mut Unstructured<'_>,
    g: fn(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<u8>> {
    Ok(gen::bytes(&g(u)?))
}

/// A header-sized message decoded as a `T`.
fn header<T: DeserializeOwned + Serialize>(b: &[u8], s: &mut Stats) {
    decode_checked::<T>(std::any::type_name::<T>(), b, MAX_HEADER_BYTES, s);
}

/// Fuzzes a family of message types: each input picks a type, a valid
/// encoding of it (or two), mutates and decodes.
fn family(target: &str, kinds: &[Kind]) {
    fuzz(target, 4096, |u, stats| {
        let (g, d) = kinds[u.choose_index(kinds.len())?];
        let seeds = vec![g(u)?, g(u)?];
        let input = mutate::input(u, &seeds, MAX_HEADER_BYTES + 16)?;
        d(&input, stats);
        Ok(())
    });
}

/// The hops a failure report is checked against: the fixed keys' peers.
fn hops() -> Vec<HopSpec> {
    (0..4)
        .map(|i| HopSpec {
            peer_id: gen::peer_id(i),
            start: u32::from(i),
            end: u32::from(i) + 1,
            addrs: vec![],
        })
        .collect()
}

/// Activation, token and vocabulary messages (a failure report that
/// decodes is also checked against a chain).
#[test]
fn act_and_vocab_messages() {
    family(
        "act_and_vocab_messages",
        &[
            (|u| seed(u, gen::act_frame), header::<ActFrame>),
            (
                |u| seed(u, gen::act_reply),
                |b, s| {
                    let r = decode_checked::<ActReply>("ActReply", b, MAX_HEADER_BYTES, s);
                    if let Some(ActReply::Failed(r)) = r {
                        check_report(b, &r);
                    }
                },
            ),
            (
                |u| seed(u, gen::failure_report),
                |b, s| {
                    let r =
                        decode_checked::<FailureReport>("FailureReport", b, MAX_HEADER_BYTES, s);
                    if let Some(r) = r {
                        check_report(b, &r);
                    }
                },
            ),
            (|u| seed(u, gen::token_frame), header::<TokenFrame>),
            (|u| seed(u, gen::step_header), header::<StepHeader>),
            (|u| seed(u, gen::open_session), header::<OpenSession>),
            (|u| seed(u, gen::vocab_request), header::<VocabRequest>),
            (|u| seed(u, gen::vocab_response), header::<VocabResponse>),
        ],
    );
}

/// A decoded failure report's check (signature against the chain) must
/// not panic.
fn check_report(input: &[u8], r: &FailureReport) {
    let hops = hops();
    check(
        "FailureReport::check",
        input,
        DECODE_CAP,
        String::new,
        || {
            let _ = r.check(r.session, &hops);
        },
    );
}

/// Manifest and piece requests and responses.
#[test]
fn fetch_messages() {
    family(
        "fetch_messages",
        &[
            (
                |u| seed(u, gen::manifest_request),
                header::<ManifestRequest>,
            ),
            (
                |u| seed(u, gen::manifest_response),
                header::<ManifestResponse>,
            ),
            (|u| seed(u, gen::piece_request), header::<PieceRequest>),
            (|u| seed(u, gen::piece_response), header::<PieceResponse>),
            (|u| seed(u, gen::piece_ref), header::<PieceRef>),
        ],
    );
}

/// `SignedBlob::verify` (the envelope of a manifest from a peer): under
/// the manifest cap, expecting the signer or another peer or nobody.
#[test]
fn signed_blobs() {
    fuzz("signed_blobs", 8192, |u, stats| {
        let payload_len = u.int_in_range(0..=256usize)?;
        let payload = u.bytes(payload_len.min(u.len()))?.to_vec();
        let blob = gen::signed_blob(u, payload)?;
        let seeds = vec![gen::bytes(&blob)];
        let input = mutate::input(u, &seeds, 16 * 1024)?;
        let expected: Option<PeerId> = match u.int_in_range(0..=2u8)? {
            0 => None,
            n => gen::peer_id(n).parse().ok(),
        };
        let (r, usage) = check(
            "signed_blobs",
            &input,
            DECODE_CAP.plus(2 * input.len()),
            || format!("expected signer {expected:?}"),
            || {
                SignedBlob::verify(
                    &input,
                    MANIFEST_DOMAIN,
                    expected.as_ref(),
                    MAX_MANIFEST_BYTES,
                )
            },
        );
        stats.record(r.is_ok(), usage);
        Ok(())
    });
}

/// A signed record's bytes: a valid one, or one whose payload (the
/// `ServerInfo` encoding) was mutated and then signed again, so that the
/// input gets past the signature to the payload's decoder and `validate`.
fn record_input(u: &mut Unstructured<'_>) -> Result<(Vec<u8>, Option<PeerId>)> {
    let k = u.int_in_range(0..=3u8)?;
    let key = gen::key(k);
    let info = gen::server_info(u, NOW_MS)?;
    // `sign` refuses what `validate` refuses; sign such an info as is.
    let signed = sign(&key, &info)
        .unwrap_or_else(|_| SignedServerInfo::sign_raw(&key, PROTOCOL_VERSION, gen::bytes(&info)));
    let bytes = if u.ratio(1, 2)? {
        let payload = mutate::input(u, std::slice::from_ref(&signed.payload), MAX_RECORD_BYTES)?;
        let version = if u.ratio(7, 8)? {
            PROTOCOL_VERSION
        } else {
            u.arbitrary()?
        };
        SignedServerInfo::sign_raw(&key, version, payload).to_bytes()
    } else {
        mutate::input(u, &[signed.to_bytes()], MAX_RECORD_BYTES + 16)?
    };
    let expected = match u.int_in_range(0..=3u8)? {
        0 => None,
        1 => gen::peer_id(k.wrapping_add(1) % 4).parse().ok(),
        _ => gen::peer_id(k).parse().ok(),
    };
    Ok((bytes, expected))
}

/// Signed `ServerInfo` records (`verify`, as the DHT filter and every
/// asker run it), at and around "now".
#[test]
fn records() {
    fuzz("records", 4096, |u, stats| {
        let (input, expected) = record_input(u)?;
        let now = NOW_MS
            .wrapping_add(u.int_in_range(0..=7_200_000)?)
            .wrapping_sub(3_600_000);
        let (r, usage) = check(
            "records",
            &input,
            // `verify` decodes twice: the envelope, then its payload.
            Cap::both(2 * DECODE_CAP.peak),
            || format!("expected {expected:?}, now {now}"),
            || verify(&input, expected.as_ref(), now),
        );
        stats.record(r.is_ok(), usage);
        if let Ok(v) = r {
            assert!(input.len() <= MAX_RECORD_BYTES);
            assert!(v.info.validate().is_ok(), "verified but invalid: {v:?}");
        }
        Ok(())
    });
}

/// The info protocol's messages: `InfoRequest::from_bytes`,
/// `InfoResponse::from_bytes` and, inside a `Serving` answer, the record.
#[test]
fn info_messages() {
    fuzz("info_messages", 4096, |u, stats| {
        if u.ratio(1, 3)? {
            let seeds = vec![gen::bytes(&gen::info_request(u)?)];
            let input = mutate::input(u, &seeds, MAX_INFO_REQUEST_BYTES + 16)?;
            let (r, usage) = check("InfoRequest", &input, DECODE_CAP, String::new, || {
                InfoRequest::from_bytes(&input)
            });
            stats.record(r.is_ok(), usage);
        } else {
            let (record, expected) = record_input(u)?;
            let seeds = vec![gen::bytes(&gen::info_response(u, record)?)];
            let input = mutate::input(u, &seeds, MAX_INFO_RESPONSE_BYTES + 16)?;
            let (r, usage) = check(
                "InfoResponse",
                &input,
                Cap::both(3 * DECODE_CAP.peak),
                String::new,
                || match InfoResponse::from_bytes(&input) {
                    Ok(InfoResponse::Serving(rec)) => verify(&rec, expected.as_ref(), NOW_MS)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Ok(InfoResponse::NotServing) => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            );
            stats.record(r.is_ok(), usage);
        }
        Ok(())
    });
}

/// DHT keys of records and provider records (`DhtKey::parse`, the first
/// check of every inbound record): a key that parses is canonical, i.e.
/// it prints back as the very same bytes.
#[test]
fn dht_keys() {
    fuzz("dht_keys", 1024, |u, stats| {
        let seeds = vec![gen::dht_key(u)?.into_bytes(), gen::dht_key(u)?.into_bytes()];
        let input = mutate::input(u, &seeds, 512)?;
        let (r, usage) = check(
            "dht_keys",
            &input,
            Cap::both(16 * 1024),
            String::new,
            || DhtKey::parse(&input),
        );
        stats.record(r.is_some(), usage);
        if let Some(k) = r {
            assert_eq!(
                k.to_key_string().as_bytes(),
                &input[..],
                "a parsed key is not canonical: {k:?}"
            );
        }
        Ok(())
    });
}

/// The info protocol's codec (`InfoCodec::read_request`/`read_response`,
/// as libp2p's request-response calls them on every inbound stream): a
/// 4-byte big-endian length, then the body; the body's buffer is at most
/// the message's cap.
#[test]
fn info_codec() {
    let proto = StreamProtocol::new(INFO_PROTOCOL);
    fuzz("info_codec", 4096, |u, stats| {
        let request = u.ratio(1, 3)?;
        let body = if request {
            gen::bytes(&gen::info_request(u)?)
        } else {
            let (record, _) = record_input(u)?;
            gen::bytes(&gen::info_response(u, record)?)
        };
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        let max = if request {
            MAX_INFO_REQUEST_BYTES
        } else {
            MAX_INFO_RESPONSE_BYTES
        };
        let input = mutate::input(u, &[framed], max + 64)?;
        let shape = stream::Shape::arbitrary(u, 2 * max, &[max])?;
        let (ok, usage) = check(
            "info_codec",
            &input,
            DECODE_CAP.plus(max),
            || format!("request: {request}, stream {shape:?}"),
            || {
                let mut s = stream::Stream::new(&input, shape);
                let mut c = InfoCodec::default();
                if request {
                    block_on(c.read_request(&proto, &mut s)).is_ok()
                } else {
                    block_on(c.read_response(&proto, &mut s)).is_ok()
                }
            },
        );
        stats.record(ok, usage);
        Ok(())
    });
}

/// Hand-built messages that make bincode and serde allocate the most per
/// input byte: long lists of empty strings (24 bytes each in memory from
/// 1 input byte) and of small structs, whole or claiming far more
/// elements than they hold. All stay within [`DECODE_CAP`].
#[test]
fn decode_worst_cases() {
    use nakshatra_fuzz::mutate::varint;
    use nakshatra_slicer::{Manifest, ModelHashes};
    fn run<T: DeserializeOwned>(what: &str, input: &[u8], max: usize, must_decode: bool) {
        let (r, usage) = check(
            "decode_worst_cases",
            input,
            DECODE_CAP,
            || what.into(),
            || {
                decode::<T>(input, max)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        );
        assert_eq!(r.is_ok(), must_decode, "{what}: {r:?}");
        eprintln!(
            "decode worst case {what} ({} bytes): largest {} B, peak {} B",
            input.len(),
            usage.largest,
            usage.peak
        );
    }
    let cat = |parts: &[&[u8]]| parts.concat();
    // OpenSession: one hop whose address list has 65,000 empty strings,
    // in one header's worth of bytes; and one that claims 10^9.
    for (n, present, ok) in [
        (65_000u64, 65_000usize, true),
        (1_000_000_000, 5_000, false),
    ] {
        let sampling = [0u8; 10];
        let input = cat(&[
            &[0, 0, 1, 0, 0, 0],
            &varint(n, 0),
            &vec![0u8; present],
            &[0],
            &sampling,
            // wire (F32), asker (""), direct (true), ring (None)
            &[0, 0, 1, 0],
        ]);
        run::<OpenSession>(
            "OpenSession with empty addresses",
            &input,
            MAX_HEADER_BYTES,
            ok,
        );
    }
    // ModelHashes (the vocabulary's companion, up to 16 MiB): as many
    // empty block hashes as bincode's limit lets through, and more.
    for (n, ok) in [(120_000u64, true), (140_000, false)] {
        let input = cat(&[&[0, 0, 0, 0], &varint(n, 0), &vec![0u8; n as usize]]);
        run::<ModelHashes>("ModelHashes with empty hashes", &input, 1 << 24, ok);
    }
    // Manifest: one piece with 32,000 tensors of 5 zero bytes each (the
    // claims of each, 32 bytes, fill bincode's limit), and 40,000.
    for (n, ok) in [(32_000u64, true), (40_000, false)] {
        let input = cat(&[
            &[0, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 0],
            &varint(n, 0),
            &vec![0u8; 5 * n as usize],
            &[0, 0],
        ]);
        run::<Manifest>("Manifest with tiny tensors", &input, MAX_MANIFEST_BYTES, ok);
    }
}
