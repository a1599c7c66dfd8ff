//! bincode codec of the `/nakshatra/info/1` and `/nakshatra/view/1`
//! request-response protocols: one frame each way, a 4-byte big-endian
//! length then the bincode body, both size-capped before anything is
//! allocated.

use std::{io, marker::PhantomData};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use nakshatra_protocol::{
    rpc::{
        InfoRequest, InfoResponse, ViewRequest, ViewResponse, MAX_INFO_REQUEST_BYTES,
        MAX_INFO_RESPONSE_BYTES, MAX_VIEW_REQUEST_BYTES, MAX_VIEW_RESPONSE_BYTES,
    },
    RecordError,
};

/// A message sent as one frame: its wire form and the largest frame a
/// reader accepts for it.
pub trait Frame: Sized + Send {
    /// Largest body accepted, bytes; a longer length prefix is refused
    /// before anything is allocated.
    const MAX_BYTES: usize;
    /// The wire form.
    fn encode(&self) -> Vec<u8>;
    /// Parses and checks the wire form.
    fn decode(bytes: &[u8]) -> Result<Self, RecordError>;
}

macro_rules! frame {
    ($t:ty, $max:expr) => {
        impl Frame for $t {
            const MAX_BYTES: usize = $max;
            fn encode(&self) -> Vec<u8> {
                self.to_bytes()
            }
            fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
                <$t>::from_bytes(bytes)
            }
        }
    };
}

frame!(InfoRequest, MAX_INFO_REQUEST_BYTES);
frame!(InfoResponse, MAX_INFO_RESPONSE_BYTES);
frame!(ViewRequest, MAX_VIEW_REQUEST_BYTES);
frame!(ViewResponse, MAX_VIEW_RESPONSE_BYTES);

/// [`request_response::Codec`] of a protocol with one [`Frame`] each way;
/// stateless, so one value serves every stream. Public so that the fuzz
/// tests can feed its readers hostile bytes; nodes only use it inside the
/// swarm.
pub struct FrameCodec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for FrameCodec<Req, Resp> {
    fn default() -> Self {
        FrameCodec(PhantomData)
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req, Resp> Copy for FrameCodec<Req, Resp> {}

impl<Req, Resp> std::fmt::Debug for FrameCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameCodec")
    }
}

/// The codec of `/nakshatra/info/1`.
pub type InfoCodec = FrameCodec<InfoRequest, InfoResponse>;
/// The codec of `/nakshatra/view/1`.
pub type ViewCodec = FrameCodec<ViewRequest, ViewResponse>;

async fn read_frame<M: Frame, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<M> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > M::MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {}", M::MAX_BYTES),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    M::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<M: Frame, T: AsyncWrite + Unpin + Send>(io: &mut T, m: M) -> io::Result<()> {
    let body = m.encode();
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

impl<Req: Frame, Resp: Frame> request_response::Codec for FrameCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, res).await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    use super::*;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(nakshatra_protocol::rpc::INFO_PROTOCOL)
    }

    #[tokio::test]
    async fn frames_round_trip_and_caps_hold() {
        let mut c = InfoCodec::default();
        let mut buf = Cursor::new(Vec::new());
        let resp = InfoResponse::Serving(vec![5; 100]);
        c.write_response(&proto(), &mut buf, resp.clone())
            .await
            .unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(c.read_response(&proto(), &mut rd).await.unwrap(), resp);

        // A length prefix beyond the cap is refused before allocating.
        let mut rd = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(c.read_response(&proto(), &mut rd).await.is_err());
        let mut rd = Cursor::new(1000u32.to_be_bytes().to_vec());
        assert!(c.read_request(&proto(), &mut rd).await.is_err());
        // Truncated and garbage frames.
        let mut rd = Cursor::new(vec![0, 0, 0, 10, 1, 2]);
        assert!(c.read_response(&proto(), &mut rd).await.is_err());
        let mut rd = Cursor::new(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(c.read_response(&proto(), &mut rd).await.is_err());
    }
}
