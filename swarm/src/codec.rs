//! bincode codec of the `/nakshatra/info/1` request-response protocol:
//! one frame each way, a 4-byte big-endian length then the bincode body,
//! both size-capped before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use nakshatra_protocol::rpc::{
    InfoRequest, InfoResponse, ViewRequest, ViewResponse, MAX_INFO_REQUEST_BYTES,
    MAX_INFO_RESPONSE_BYTES, MAX_VIEW_REQUEST_BYTES, MAX_VIEW_RESPONSE_BYTES,
};

/// [`request_response::Codec`] of the info protocol; stateless, so one
/// value serves every stream. Public so that the fuzz tests can feed its
/// readers hostile bytes; nodes only use it inside the swarm.
#[derive(Debug, Clone, Copy, Default)]
pub struct InfoCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl request_response::Codec for InfoCodec {
    type Protocol = StreamProtocol;
    type Request = InfoRequest;
    type Response = InfoResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<InfoRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, MAX_INFO_REQUEST_BYTES).await?;
        InfoRequest::from_bytes(&body).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<InfoResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, MAX_INFO_RESPONSE_BYTES).await?;
        InfoResponse::from_bytes(&body).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: InfoRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.to_bytes()).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: InfoResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res.to_bytes()).await
    }
}

/// [`request_response::Codec`] of the view protocol
/// (`/nakshatra/view/1`): the same framing as [`InfoCodec`], with the view
/// messages' caps.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewCodec;

impl request_response::Codec for ViewCodec {
    type Protocol = StreamProtocol;
    type Request = ViewRequest;
    type Response = ViewResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ViewRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, MAX_VIEW_REQUEST_BYTES).await?;
        ViewRequest::from_bytes(&body).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ViewResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, MAX_VIEW_RESPONSE_BYTES).await?;
        ViewResponse::from_bytes(&body).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ViewRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.to_bytes()).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: ViewResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res.to_bytes()).await
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
        let mut c = InfoCodec;
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
