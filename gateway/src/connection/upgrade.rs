//! An allowed first HTTP/1 request that asks to switch protocols (`Upgrade`, e.g. WebSocket):
//! it goes up alone, and the server's status line says whether what follows is still HTTP.
//! After `101 Switching Protocols` both directions are opaque (the splice relay); otherwise the
//! connection goes on request by request. Bounded by `peek.timeoutMs` and a byte cap.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reader::PeekReader;

/// Most server bytes read to find the end of its status line (RFC 9112 §4); nginx's is 30.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Sends the first request's head (`head_len` bytes from what was forwarded so far), relays the
/// server's answer up to the end of its status line to the client, and says whether the server
/// switched protocols.
pub async fn first_upgrade<C, U>(
    client: &mut C,
    upstream: &mut U,
    reader: &mut PeekReader,
    head_len: usize,
    timeout: Duration,
) -> io::Result<bool>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let io = async {
        let end = (reader.forwarded + head_len).min(reader.buf.len());
        let head = reader.buf.get(reader.forwarded..end).unwrap_or_default();
        upstream.write_all(head).await?;
        reader.forwarded = end;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !answer.contains(&b'\n') {
            if answer.len() >= MAX_STATUS_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no status line in the server's first 8 KiB",
                ));
            }
            let read = upstream.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..read]);
        }
        client.write_all(&answer).await?;
        // RFC 9110 §15.2.2: 101 only answers an HTTP/1.1 Upgrade.
        Ok(answer.starts_with(b"HTTP/1.1 101"))
    };
    tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to the upgrade"))?
}
