//! Length-prefixed frames of `kiln_protocol::encoding` for request-response.
//!
//! Frame: 4-byte big-endian length, then that many bytes. Lengths above the
//! configured maximum are refused before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kiln_protocol::encoding;
use kiln_protocol::{NetRequest, NetResponse};
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Clone, Debug)]
pub struct RpcCodec {
    max_bytes: usize,
}

impl RpcCodec {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }
}

async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(
    io: &mut R,
    max: usize,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    // Grow with what arrives: a peer that declares 32 MiB and sends
    // nothing costs nothing (pre-sizing to `len` would let every stream
    // reserve the maximum for free).
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the peer closed after {} of the {len} bytes it announced",
                buf.len()
            ),
        ));
    }
    encoding::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

async fn write_frame<T: Serialize, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    value: &T,
    max: usize,
) -> io::Result<()> {
    let buf = encoding::encode(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message of {} bytes exceeds the {max}-byte limit",
                buf.len()
            ),
        ));
    }
    let len = u32::try_from(buf.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&buf).await?;
    io.close().await
}

impl libp2p::request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = NetRequest;
    type Response = NetResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<NetRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<NetResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: NetRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: NetResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(declared: u32, body: &[u8]) -> futures::io::Cursor<Vec<u8>> {
        let mut b = declared.to_be_bytes().to_vec();
        b.extend_from_slice(body);
        futures::io::Cursor::new(b)
    }

    #[tokio::test]
    async fn frames_are_bounded_and_a_short_one_is_named() {
        let max = 1 << 20;
        // Declared past the limit: refused before anything is read.
        let e = read_frame::<NetRequest, _>(&mut frame(max as u32 + 1, b""), max)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("exceeds the 1048576-byte limit"),
            "{e}"
        );
        // Declared within it but never sent: the buffer only ever held what
        // came (10 bytes), and the error says so.
        let e = read_frame::<NetRequest, _>(&mut frame(max as u32, &[0; 10]), max)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            e.to_string().contains("after 10 of the 1048576 bytes"),
            "{e}"
        );
    }
}
