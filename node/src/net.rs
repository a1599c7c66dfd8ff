//! Length-prefixed frames on libp2p streams, and hidden-state encodings.
//!
//! A frame is `u32 LE header length, header (bincode), u32 LE payload
//! length, payload` (see `nakshatra_protocol::act`). Both lengths are
//! checked against the protocol's caps before anything is allocated.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use nakshatra_swarm::protocol::act::{WireDtype, MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES};
use nakshatra_swarm::protocol::{decode, encode};
use serde::{de::DeserializeOwned, Serialize};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or closed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// A length over the protocol's cap.
    #[error("frame {what} of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Header or payload.
        what: &'static str,
        /// Claimed length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The header does not decode (or, writing, does not encode).
    #[error("malformed frame: {0}")]
    Malformed(#[source] nakshatra_swarm::protocol::RecordError),
}

impl FrameError {
    /// Whether the stream ended or broke, as opposed to the peer sending
    /// something wrong (a stream the receiver dropped at open fails this
    /// way before any answer).
    pub fn is_stream_loss(&self) -> bool {
        matches!(self, FrameError::Io(_))
    }
}

/// A peer, and why what it sent was refused (the last of several peers
/// tried, in the errors of operations that ask one peer after another).
#[derive(Debug, thiserror::Error)]
#[error("{peer}: {source}")]
pub struct Refusal<E: std::error::Error + 'static> {
    /// The peer.
    pub peer: nakshatra_swarm::PeerId,
    /// Why its answer was refused.
    #[source]
    pub source: E,
}

impl<E: std::error::Error + 'static> Refusal<E> {
    /// `peer`'s answer was refused for `source` (boxed: a PeerId is large).
    pub fn boxed(peer: nakshatra_swarm::PeerId, source: E) -> Box<Self> {
        Box::new(Self { peer, source })
    }
}

/// Why a one-shot request ([`request`]) got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No stream to the peer, or the exchange failed on every stream tried.
    #[error(transparent)]
    Stream(#[from] nakshatra_swarm::OpenError<FrameError>),
    /// The whole exchange took longer than allowed.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Writes one frame and flushes.
pub async fn write_frame<W, H>(w: &mut W, header: &H, payload: &[u8]) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    H: Serialize,
{
    write_frame_parts(w, header, &[payload]).await
}

/// Writes one frame whose payload is the concatenation of `parts`, without
/// joining them first, and flushes.
pub async fn write_frame_parts<W, H>(
    w: &mut W,
    header: &H,
    parts: &[&[u8]],
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    H: Serialize,
{
    let h = encode(header).map_err(FrameError::Malformed)?;
    if h.len() > MAX_HEADER_BYTES {
        return Err(FrameError::TooLarge {
            what: "header",
            len: h.len(),
            max: MAX_HEADER_BYTES,
        });
    }
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD_BYTES {
        return Err(FrameError::TooLarge {
            what: "payload",
            len,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let mut head = Vec::with_capacity(8 + h.len());
    head.extend_from_slice(&(h.len() as u32).to_le_bytes());
    head.extend_from_slice(&h);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    if len <= 64 * 1024 {
        // Small frames (every decode step) go out in one write.
        for p in parts {
            head.extend_from_slice(p);
        }
        w.write_all(&head).await?;
    } else {
        // Large payloads are not copied again.
        w.write_all(&head).await?;
        for p in parts {
            w.write_all(p).await?;
        }
    }
    w.flush().await?;
    Ok(())
}

async fn read_len<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
    max: usize,
) -> Result<usize, FrameError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    let len = u32::from_le_bytes(b) as usize;
    if len > max {
        return Err(FrameError::TooLarge { what, len, max });
    }
    Ok(len)
}

/// Bytes a frame's payload buffer grows by at most ahead of the bytes that
/// arrived: a peer that announces a large payload and sends nothing costs
/// this much, not the announced length.
pub const PAYLOAD_GROWTH_STEP: usize = 1 << 20;

/// Reads one frame that carries no payload (requests, replies, token
/// frames): a frame announcing any payload is refused before its payload
/// is read.
pub async fn read_message<R, H>(r: &mut R) -> Result<H, FrameError>
where
    R: AsyncRead + Unpin,
    H: DeserializeOwned,
{
    let mut none = Vec::new();
    let (header, _) = read_frame_into(r, &mut none, |_: &H| 0).await?;
    Ok(header)
}

/// Reads one frame whose payload may be up to `max_payload` bytes (the
/// per-message cap of the caller's protocol).
pub async fn read_frame<R, H>(r: &mut R, max_payload: usize) -> Result<(H, Vec<u8>), FrameError>
where
    R: AsyncRead + Unpin,
    H: DeserializeOwned,
{
    let mut payload = Vec::new();
    let (header, n) = read_frame_into(r, &mut payload, |_: &H| max_payload).await?;
    payload.truncate(n);
    Ok((header, payload))
}

/// Reads one frame, its payload into the front of `payload`; returns the
/// header and the payload's length. `max_payload` says, from the decoded
/// header, how many payload bytes this message may carry (0 for a
/// message that carries none); a longer payload is refused before any of
/// it is read. The buffer grows as bytes arrive, at most
/// [`PAYLOAD_GROWTH_STEP`] ahead of them, and is never shrunk, so a reused
/// buffer is neither reallocated nor cleared again. Its capacity never
/// passes the announced length (so never the cap): it grows by doubling,
/// as a `Vec` does, but clamped to that length.
pub async fn read_frame_into<R, H>(
    r: &mut R,
    payload: &mut Vec<u8>,
    max_payload: impl FnOnce(&H) -> usize,
) -> Result<(H, usize), FrameError>
where
    R: AsyncRead + Unpin,
    H: DeserializeOwned,
{
    let hl = read_len(r, "header", MAX_HEADER_BYTES).await?;
    let mut h = vec![0u8; hl];
    r.read_exact(&mut h).await?;
    let header = decode(&h, MAX_HEADER_BYTES).map_err(FrameError::Malformed)?;
    let max = max_payload(&header).min(MAX_PAYLOAD_BYTES);
    let pl = read_len(r, "payload", max).await?;
    let mut filled = 0;
    while filled < pl {
        let end = pl.min(filled + PAYLOAD_GROWTH_STEP);
        if payload.capacity() < end {
            // `resize` alone would double the capacity past the announced
            // length (a 7 MB chunk cap allocated 8 MiB; found by
            // fuzz/tests/frames.rs): reserve the doubling ourselves,
            // clamped to the announced length, which is under the cap.
            let want = end.max(payload.capacity().saturating_mul(2)).min(pl);
            payload.reserve_exact(want.saturating_sub(payload.len()));
        }
        if payload.len() < end {
            payload.resize(end, 0);
        }
        let chunk = payload.get_mut(filled..end).ok_or_else(|| {
            FrameError::Io(std::io::Error::other("payload buffer shorter than grown"))
        })?;
        r.read_exact(chunk).await?;
        filled = end;
    }
    Ok((header, pl))
}

/// One request and its answer on a fresh stream to `peer` (connecting
/// first if needed, and on a new stream if the peer dropped the first one
/// at open): writes `req` as a frame, reads one frame back (its payload at
/// most `max_answer` bytes), closes; all within `timeout`.
pub async fn request<Req, Resp>(
    swarm: &nakshatra_swarm::Client,
    peer: nakshatra_swarm::PeerId,
    protocol: &'static str,
    req: &Req,
    max_answer: usize,
    timeout: std::time::Duration,
) -> Result<(Resp, Vec<u8>), RequestError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let exchange = swarm.open_stream_with(
        peer,
        nakshatra_swarm::StreamProtocol::new(protocol),
        nakshatra_swarm::Reopen::DEFAULT,
        |mut s| async move {
            write_frame(&mut s, req, &[]).await.map_err(handshake)?;
            let answer = read_frame(&mut s, max_answer).await.map_err(handshake)?;
            let _ = s.close().await;
            Ok(answer)
        },
    );
    Ok(tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RequestError::Timeout(timeout))??)
}

/// Sorts a failed first exchange: a lost stream is worth another stream,
/// a wrong answer is not.
pub fn handshake(e: FrameError) -> nakshatra_swarm::Handshake<FrameError> {
    if e.is_stream_loss() {
        nakshatra_swarm::Handshake::Dropped(e)
    } else {
        nakshatra_swarm::Handshake::Failed(e)
    }
}

/// Hidden states to wire bytes.
pub fn encode_hidden(h: &[f32], dtype: WireDtype) -> Vec<u8> {
    match dtype {
        WireDtype::F32 => {
            let mut out = Vec::with_capacity(h.len() * 4);
            for x in h {
                out.extend_from_slice(&x.to_le_bytes());
            }
            out
        }
        WireDtype::F16 => {
            let mut out = Vec::with_capacity(h.len() * 2);
            for x in h {
                out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
            }
            out
        }
    }
}

/// Wire bytes to hidden states (`None` unless a whole number of elements).
pub fn decode_hidden(b: &[u8], dtype: WireDtype) -> Option<Vec<f32>> {
    match dtype {
        WireDtype::F32 => b.len().is_multiple_of(4).then(|| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }),
        WireDtype::F16 => b.len().is_multiple_of(2).then(|| {
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nakshatra_swarm::protocol::act::{ActFrame, StepHeader, StepKind};

    #[test]
    fn hidden_round_trips() {
        let h = vec![0.0f32, -1.5, 3.25, 1e-3, 65504.0];
        assert_eq!(
            decode_hidden(&encode_hidden(&h, WireDtype::F32), WireDtype::F32),
            Some(h.clone())
        );
        let back = decode_hidden(&encode_hidden(&h, WireDtype::F16), WireDtype::F16).unwrap();
        for (a, b) in h.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-6, "{a} vs {b}");
        }
        assert_eq!(decode_hidden(&[0; 3], WireDtype::F32), None);
        assert_eq!(decode_hidden(&[0; 3], WireDtype::F16), None);
    }

    #[tokio::test]
    async fn payload_buffer_never_passes_the_announced_length() {
        // 3 MiB + 1: doubling (1, 2, 4 MiB) would pass it.
        let n = 3 * PAYLOAD_GROWTH_STEP + 1;
        let mut frame = Vec::new();
        write_frame(&mut frame, &ActFrame::Close, &vec![7; n])
            .await
            .unwrap();
        let mut buf = Vec::new();
        let (_, got) = read_frame_into::<_, ActFrame>(&mut frame.as_slice(), &mut buf, |_| n)
            .await
            .unwrap();
        assert_eq!(got, n);
        assert!(buf.capacity() <= n, "{}", buf.capacity());
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let step = ActFrame::Step(StepHeader {
            step: 3,
            pos: 10,
            n_tokens: 1,
            kind: StepKind::Hidden,
            compute_us: 5,
            draft: vec![],
            ring: false,
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &step, &[1, 2, 3, 4]).await.unwrap();
        let (h, p): (ActFrame, Vec<u8>) = read_frame(&mut buf.as_slice(), 4).await.unwrap();
        assert_eq!(h, step);
        assert_eq!(p, vec![1, 2, 3, 4]);
        // Truncated anywhere: an error, never a panic.
        for cut in 0..buf.len() {
            assert!(read_frame::<_, ActFrame>(&mut &buf[..cut], 4)
                .await
                .is_err());
        }
        // A header length over the cap is refused before allocating.
        let huge = (u32::MAX).to_le_bytes();
        let e = read_frame::<_, ActFrame>(&mut huge.as_slice(), 4)
            .await
            .unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { what: "header", .. }),
            "{e}"
        );
        // A payload length over the cap, likewise.
        let mut big = Vec::new();
        let h = encode(&ActFrame::Close).unwrap();
        big.extend_from_slice(&(h.len() as u32).to_le_bytes());
        big.extend_from_slice(&h);
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame::<_, ActFrame>(&mut big.as_slice(), MAX_PAYLOAD_BYTES)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    what: "payload",
                    ..
                }
            ),
            "{e}"
        );
        // A payload over the message's own cap is refused before it is
        // read, though under the global cap.
        let mut small = Vec::new();
        write_frame(&mut small, &ActFrame::Close, &[7; 16])
            .await
            .unwrap();
        let e = read_message::<_, ActFrame>(&mut small.as_slice())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    len: 16,
                    max: 0,
                    ..
                }
            ),
            "{e}"
        );
        // A peer that announces 200 MiB and sends 10 bytes costs at most
        // one growth step of memory, not 200 MiB.
        let mut liar = Vec::new();
        liar.extend_from_slice(&(h.len() as u32).to_le_bytes());
        liar.extend_from_slice(&h);
        liar.extend_from_slice(&(200u32 << 20).to_le_bytes());
        liar.extend_from_slice(&[1; 10]);
        let mut buf = Vec::new();
        let r =
            read_frame_into::<_, ActFrame>(&mut liar.as_slice(), &mut buf, |_| MAX_PAYLOAD_BYTES)
                .await;
        assert!(matches!(r, Err(FrameError::Io(_))), "{r:?}");
        assert!(buf.capacity() <= PAYLOAD_GROWTH_STEP, "{}", buf.capacity());
        // Garbage header.
        let mut g = Vec::new();
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&[0xff; 4]);
        g.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_frame::<_, ActFrame>(&mut g.as_slice(), 0).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
