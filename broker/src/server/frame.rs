//! Kafka request framing: a 4-byte big-endian length, then that many bytes.
//!
//! The length comes from the network, so it never sizes an allocation by itself: it is checked
//! against `socket.request.max.bytes` first, and the buffer grows only as bytes arrive.
//!
//! References: Kafka protocol guide, "Common Request and Response Structure".

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How much buffer to reserve per read, whatever the frame claims.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why a connection's byte stream can no longer be read as frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is negative.
    #[error("frame length {0} is negative")]
    NegativeLength(i32),
    /// The length prefix is larger than `socket.request.max.bytes`.
    #[error("frame of {length} bytes exceeds socket.request.max.bytes ({max})")]
    TooLarge {
        /// Claimed frame length.
        length: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed after {received} of {expected} frame bytes")]
    Truncated {
        /// Bytes of the frame (including the length prefix) that arrived.
        received: usize,
        /// Bytes the frame needed (including the length prefix).
        expected: usize,
    },
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads whole frames. Cancel-safe: bytes read before a cancelled call stay buffered for the
/// next one.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: R,
    buffer: BytesMut,
    max_frame_bytes: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R, max_frame_bytes: usize) -> Self {
        Self {
            inner,
            buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
            max_frame_bytes,
        }
    }

    /// The length of the next frame, once its prefix has arrived and passed the checks, before
    /// its body is read; `None` on a clean end of stream between frames. Cancel-safe.
    pub(crate) async fn next_frame_len(&mut self) -> Result<Option<usize>, FrameError> {
        while self.buffer.len() < 4 {
            self.buffer.reserve(4);
            let read = self.inner.read_buf(&mut self.buffer).await?;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    received: self.buffer.len(),
                    expected: 4,
                });
            }
        }
        let prefix = [
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ];
        let claimed = i32::from_be_bytes(prefix);
        let length = usize::try_from(claimed).map_err(|_| FrameError::NegativeLength(claimed))?;
        if length > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                length,
                max: self.max_frame_bytes,
            });
        }
        Ok(Some(length))
    }

    /// The next frame's payload (without the length prefix), or `None` on a clean end of stream
    /// between frames.
    pub(crate) async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = self.parse_buffered()? {
                return Ok(Some(frame));
            }
            let wanted = self.missing_bytes().min(READ_CHUNK_BYTES);
            self.buffer.reserve(wanted);
            let read = self.inner.read_buf(&mut self.buffer).await?;
            if read == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    received: self.buffer.len(),
                    expected: self.expected_len().unwrap_or(4),
                });
            }
        }
    }

    /// Total bytes (prefix included) of the frame at the front of the buffer, once known.
    fn expected_len(&self) -> Option<usize> {
        let prefix: [u8; 4] = self.buffer.get(..4)?.try_into().ok()?;
        let length = usize::try_from(i32::from_be_bytes(prefix)).ok()?;
        Some(length + 4)
    }

    fn missing_bytes(&self) -> usize {
        self.expected_len()
            .unwrap_or(4)
            .saturating_sub(self.buffer.len())
            .max(1)
    }

    fn parse_buffered(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(prefix) = self.buffer.get(..4) else {
            return Ok(None);
        };
        let claimed = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let length = usize::try_from(claimed).map_err(|_| FrameError::NegativeLength(claimed))?;
        if length > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                length,
                max: self.max_frame_bytes,
            });
        }
        if self.buffer.len() < 4 + length {
            return Ok(None);
        }
        self.buffer.advance(4);
        Ok(Some(self.buffer.split_to(length).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn frames_from(bytes: &[u8], max: usize) -> Vec<Result<Option<Bytes>, String>> {
        let (mut client, server) = tokio::io::duplex(1024);
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            // Dribble bytes to exercise partial reads.
            for chunk in bytes.chunks(3) {
                client.write_all(chunk).await.ok();
            }
        });
        let mut reader = FrameReader::new(server, max);
        let mut out = Vec::new();
        loop {
            match reader.read_frame().await {
                Ok(Some(frame)) => out.push(Ok(Some(frame))),
                Ok(None) => {
                    out.push(Ok(None));
                    break;
                }
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn reads_frames_split_across_reads() {
        let mut bytes = Vec::new();
        for payload in [&b"hello"[..], b"", b"world!"] {
            bytes.extend_from_slice(&(payload.len() as i32).to_be_bytes());
            bytes.extend_from_slice(payload);
        }
        let frames = frames_from(&bytes, 1024).await;
        assert_eq!(
            frames,
            vec![
                Ok(Some(Bytes::from_static(b"hello"))),
                Ok(Some(Bytes::new())),
                Ok(Some(Bytes::from_static(b"world!"))),
                Ok(None)
            ]
        );
    }

    #[tokio::test]
    async fn rejects_negative_oversized_and_truncated() {
        let frames = frames_from(&(-5i32).to_be_bytes(), 1024).await;
        assert_eq!(frames, vec![Err("frame length -5 is negative".to_string())]);

        let frames = frames_from(&(i32::MAX).to_be_bytes(), 1024).await;
        assert!(
            frames[0].as_ref().unwrap_err().contains("exceeds"),
            "{frames:?}"
        );

        let mut bytes = 10i32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let frames = frames_from(&bytes, 1024).await;
        assert_eq!(
            frames,
            vec![Err(
                "connection closed after 7 of 14 frame bytes".to_string()
            )]
        );
    }
}
