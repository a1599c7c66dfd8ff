//! Fuzz targets: the node's length-prefixed frame readers
//! (`net::read_message`, `net::read_frame`, `net::read_frame_into`, with
//! the payload caps the hop, the piece fetcher and the one-shot requests
//! use) over hostile streams, and the payload decoders
//! (`net::decode_hidden`, `tokens_from_bytes`). See the crate doc.

use arbitrary::{Result, Unstructured};
use futures::executor::block_on;
use nakshatra_fuzz::harness::unhex;
use nakshatra_fuzz::harness::DECODE_CAP;
use nakshatra_fuzz::{check, fuzz, gen, mutate, stream, Cap, Stats};
use nakshatra_node::net::{
    decode_hidden, encode_hidden, read_frame, read_frame_into, read_message, FrameError,
    PAYLOAD_GROWTH_STEP,
};
use nakshatra_node::vocab::MAX_VOCAB_BYTES;
use nakshatra_swarm::protocol::act::{
    tokens_from_bytes, tokens_to_bytes, ActFrame, ActReply, TokenFrame, VocabRequest,
    VocabResponse, WireDtype, MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES,
};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, PieceRequest, PieceResponse, MAX_CHUNK_BYTES,
    MAX_MANIFEST_BYTES,
};
use serde::de::DeserializeOwned;

#[global_allocator]
static ALLOC: nakshatra_fuzz::CountingAlloc = nakshatra_fuzz::CountingAlloc;

/// Most filler bytes a stream carries after its given bytes: enough for
/// several growth steps of a payload buffer, little enough for thousands
/// of inputs a second.
const MAX_FILLER: usize = 6 * PAYLOAD_GROWTH_STEP + 12_345;

/// `header` encoded as a frame: lengths, header, payload length
/// `payload_len` (no payload bytes: the stream's filler brings them).
fn frame(header: &[u8], payload_len: u32) -> Vec<u8> {
    let mut f = (header.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&payload_len.to_le_bytes());
    f
}

/// A payload length for a frame whose message may carry `cap` bytes:
/// around the cap, around a growth step, or anything.
fn payload_len(u: &mut Unstructured<'_>, cap: usize) -> Result<u32> {
    let base: usize = match u.int_in_range(0..=5u8)? {
        0 => 0,
        1 => cap,
        2 => PAYLOAD_GROWTH_STEP,
        3 => u.int_in_range(0..=MAX_FILLER)?,
        4 => MAX_PAYLOAD_BYTES,
        _ => return u.arbitrary(),
    };
    let delta = u.int_in_range(0..=2usize)?;
    Ok(u32::try_from((base + delta).saturating_sub(1)).unwrap_or(u32::MAX))
}

/// Frames of messages without payload, read with `read_message` as every
/// request, reply and token frame is: the only buffer is the header's
/// (at most `MAX_HEADER_BYTES`), then its decode.
#[test]
fn messages_without_payload() {
    fn one<H: DeserializeOwned>(
        header: Vec<u8>,
        u: &mut Unstructured<'_>,
        stats: &mut Stats,
    ) -> Result<()> {
        let len = payload_len(u, 0)?;
        let seed = frame(&header, if u.ratio(3, 4)? { 0 } else { len });
        let input = mutate::input(u, &[seed], MAX_HEADER_BYTES + 64)?;
        let shape = stream::Shape::arbitrary(u, MAX_HEADER_BYTES + 16, &[MAX_HEADER_BYTES])?;
        let (ok, usage) = check(
            "messages_without_payload",
            &input,
            DECODE_CAP.plus(MAX_HEADER_BYTES),
            || {
                format!(
                    "read_message::<{}>, stream {shape:?}",
                    std::any::type_name::<H>()
                )
            },
            || {
                block_on(read_message::<_, H>(&mut stream::Stream::new(
                    &input, shape,
                )))
                .is_ok()
            },
        );
        stats.record(ok, usage);
        Ok(())
    }
    fuzz("messages_without_payload", 4096, |u, stats| {
        match u.int_in_range(0..=5u8)? {
            0 => one::<ActFrame>(gen::bytes(&gen::act_frame(u)?), u, stats),
            1 => one::<ActReply>(gen::bytes(&gen::act_reply(u)?), u, stats),
            2 => one::<TokenFrame>(gen::bytes(&gen::token_frame(u)?), u, stats),
            3 => one::<VocabRequest>(gen::bytes(&gen::vocab_request(u)?), u, stats),
            4 => one::<ManifestRequest>(gen::bytes(&gen::manifest_request(u)?), u, stats),
            _ => one::<PieceRequest>(gen::bytes(&gen::piece_request(u)?), u, stats),
        }
    });
}

/// Which reader, with which payload cap, as the node calls them.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// The hop's step reader: `read_frame_into` with a cap of
    /// `min(n_tokens, ctx) × per_token` for a step, 0 otherwise.
    Hop { ctx: u32, per_token: usize },
    /// The piece fetcher: `read_frame_into`, `len` bytes for `Data`.
    Piece { len: usize },
    /// A one-shot request's answer: `read_frame` with a fixed cap (the
    /// vocabulary's, the manifest's).
    Request { max: usize, vocab: bool },
}

/// Frames with payloads under the caps the node reads them with: the
/// payload buffer never grows past the cap the header allows, nor much
/// ahead of the bytes that arrived, and nothing else grows with the
/// announced length.
#[test]
fn frames_with_payload() {
    fuzz("frames_with_payload", 4096, frame_with_payload);
}

fn frame_with_payload(u: &mut Unstructured<'_>, stats: &mut Stats) -> Result<()> {
    let reader = match u.int_in_range(0..=2u8)? {
        0 => Reader::Hop {
            ctx: *u.choose(&[1u32, 7, 512, 2048, 8192])?,
            per_token: *u.choose(&[4usize, 2 * 576, 4 * 576, 2 * 4096, 4 * 8192])?,
        },
        1 => Reader::Piece {
            len: u.int_in_range(0..=MAX_CHUNK_BYTES as usize)?,
        },
        _ => {
            let vocab = u.arbitrary()?;
            let max = if vocab {
                MAX_VOCAB_BYTES
            } else {
                MAX_MANIFEST_BYTES
            };
            Reader::Request { max, vocab }
        }
    };
    let header = match reader {
        Reader::Hop { .. } => gen::bytes(&gen::act_frame(u)?),
        Reader::Piece { .. } => gen::bytes(&gen::piece_response(u)?),
        Reader::Request { vocab: true, .. } => gen::bytes(&gen::vocab_response(u)?),
        Reader::Request { vocab: false, .. } => gen::bytes(&gen::manifest_response(u)?),
    };
    let nominal = match reader {
        Reader::Hop { ctx, per_token } => ctx as usize * per_token,
        Reader::Piece { len } => len,
        Reader::Request { max, .. } => max,
    };
    let seed = frame(&header, payload_len(u, nominal)?);
    let input = mutate::input(u, &[seed], MAX_HEADER_BYTES + 64)?;
    let shape = stream::Shape::arbitrary(
        u,
        MAX_FILLER,
        &[nominal, PAYLOAD_GROWTH_STEP, 2 * PAYLOAD_GROWTH_STEP],
    )?;
    // Sometimes a buffer the caller reuses (allocated before the read).
    let reused = if u.ratio(1, 4)? {
        u.int_in_range(0..=3 * PAYLOAD_GROWTH_STEP)?
    } else {
        0
    };
    run_frame(reader, &input, shape, reused, stats);
    Ok(())
}

/// Reads `input` then `shape`'s filler with `reader` into a buffer of
/// `reused` bytes, and checks what the read allocated.
fn run_frame(reader: Reader, input: &[u8], shape: stream::Shape, reused: usize, stats: &mut Stats) {
    let mut buf = vec![0u8; reused];
    let initial = buf.capacity();
    let mut s = stream::Stream::new(input, shape);
    // The cap the header allowed, recorded by the limit closure.
    let mut allowed = 0usize;
    let ((ok, n), usage) = check(
        "frames_with_payload",
        input,
        // Header buffer, header decode and the payload under its cap
        // (at most MAX_FILLER arrives, so the cap that matters is that).
        DECODE_CAP.plus(MAX_HEADER_BYTES + 2 * (MAX_FILLER + PAYLOAD_GROWTH_STEP)),
        || format!("{reader:?}, stream {shape:?}, reused buffer of {initial} bytes"),
        || read(reader, &mut s, &mut buf, &mut allowed),
    );
    stats.record(ok, usage);
    let allowed = allowed.min(MAX_PAYLOAD_BYTES);
    let delivered = s.delivered();
    let context = || {
        format!(
            "{reader:?}, stream {shape:?}, delivered {delivered}, reused buffer of {initial} \
             bytes; input {}",
            nakshatra_fuzz::harness::hex(input)
        )
    };
    // The payload buffer: never past the cap the header allowed (unless
    // the caller's buffer was already larger), nor more than one growth
    // step (doubled, as a Vec grows) ahead of the bytes that arrived.
    let grown_ok = buf.capacity() <= initial
        || (buf.capacity() <= allowed && buf.capacity() <= 2 * (delivered + PAYLOAD_GROWTH_STEP));
    assert!(
        grown_ok,
        "frames_with_payload: payload buffer of {} bytes, cap {allowed}: {}",
        buf.capacity(),
        context()
    );
    if ok {
        assert!(
            n <= allowed,
            "payload of {n} over its cap {allowed}: {}",
            context()
        );
    }
}

/// Inputs on which the payload buffer grew past its cap before
/// `read_frame_into` clamped its growth to the announced length: a
/// 4-byte payload got an 8-byte buffer (a `Vec`'s smallest), and a piece
/// chunk capped at 7,221,060 bytes an 8 MiB one once 4 MiB had arrived.
#[test]
fn regression_payload_buffer_past_its_cap() {
    let mut stats = Stats::default();
    let quiet = |filler, filler_byte, max_chunk, fail_at_end| stream::Shape {
        filler,
        filler_byte,
        max_chunk,
        pending_every: 0,
        fail_at_end,
    };
    run_frame(
        Reader::Hop {
            ctx: 1,
            per_token: 4,
        },
        &unhex("06000000012d3d1d000404000000"),
        quiet(0, 41, usize::MAX, true),
        0,
        &mut stats,
    );
    run_frame(
        Reader::Piece { len: 7_221_060 },
        &unhex("0a00000000fd8c3500000000000000136e00"),
        quiet(4_460_712, 60, 64, false),
        0,
        &mut stats,
    );
    // The same chunk, all of it sent: accepted, in a buffer of exactly
    // the announced length.
    run_frame(
        Reader::Piece { len: 7_221_060 },
        &unhex("0a00000000fd8c3500000000000000136e00"),
        quiet(0x6e_1300, 60, 1 << 16, false),
        0,
        &mut stats,
    );
    assert_eq!(stats.accepted, 1);
}

/// Reads one frame with `reader`'s function and cap; returns whether it
/// was accepted and the payload length.
fn read(
    reader: Reader,
    s: &mut stream::Stream<'_>,
    buf: &mut Vec<u8>,
    allowed: &mut usize,
) -> (bool, usize) {
    let r: std::result::Result<usize, FrameError> = match reader {
        Reader::Hop { ctx, per_token } => block_on(read_frame_into(s, buf, |f: &ActFrame| {
            let cap = match f {
                ActFrame::Step(h) => (h.n_tokens.min(ctx) as usize).saturating_mul(per_token),
                _ => 0,
            };
            *allowed = cap;
            cap
        }))
        .map(|(_, n)| n),
        Reader::Piece { len } => block_on(read_frame_into(s, buf, |r: &PieceResponse| {
            let cap = match r {
                PieceResponse::Data { .. } => len,
                _ => 0,
            };
            *allowed = cap;
            cap
        }))
        .map(|(_, n)| n),
        Reader::Request { max, vocab } => {
            *allowed = max;
            // `read_frame` makes its own buffer: hand it back in `buf` so
            // that its size is checked like the others.
            let r = if vocab {
                block_on(read_frame::<_, VocabResponse>(s, max)).map(|(_, p)| p)
            } else {
                block_on(read_frame::<_, ManifestResponse>(s, max)).map(|(_, p)| p)
            };
            r.map(|p| {
                let n = p.len();
                *buf = p;
                n
            })
        }
    };
    match r {
        Ok(n) => (true, n),
        Err(_) => (false, 0),
    }
}

/// The payload decoders: hidden states (f32 and f16) and token ids. Each
/// output is at most twice its input (f16 widens to f32), exactly the
/// elements the input holds, and re-encodes to the same bytes.
#[test]
fn payload_decoders() {
    fuzz("payload_decoders", 65_536, |u, stats| {
        let n = u.int_in_range(0..=u.len())?;
        let input = u.bytes(n)?.to_vec();
        let which = u.int_in_range(0..=2u8)?;
        let (ok, usage) = check(
            "payload_decoders",
            &input,
            Cap::both(2 * input.len()),
            || format!("decoder {which}"),
            || match which {
                0 => decode_hidden(&input, WireDtype::F32).map(|v| {
                    assert_eq!(v.len(), input.len() / 4);
                    assert_eq!(encode_hidden(&v, WireDtype::F32), input);
                }),
                1 => decode_hidden(&input, WireDtype::F16).map(|v| {
                    assert_eq!(v.len(), input.len() / 2);
                    let back = encode_hidden(&v, WireDtype::F16);
                    for (i, (a, b)) in input.chunks(2).zip(back.chunks(2)).enumerate() {
                        if !v[i].is_nan() {
                            assert_eq!(a, b, "f16 element {i} does not round-trip");
                        }
                    }
                }),
                _ => tokens_from_bytes(&input).map(|t| {
                    assert_eq!(t.len(), input.len() / 4);
                    assert_eq!(tokens_to_bytes(&t), input);
                }),
            },
        );
        let whole = match which {
            1 => input.len() % 2 == 0,
            _ => input.len() % 4 == 0,
        };
        assert_eq!(
            ok.is_some(),
            whole,
            "decoder {which} on {} bytes",
            input.len()
        );
        stats.record(ok.is_some(), usage);
        Ok(())
    });
}
