//! Request framing on the member → controller TCP connection: a `u32` big-endian length
//! (1 ..= [`MAX_FRAME`]) followed by that many bytes. The length is checked before anything is
//! allocated, so a hostile prefix costs four bytes of reading, never a large buffer.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side sends or accepts.
pub(crate) const MAX_FRAME: usize = 65_536;

/// The frame length a prefix announces, if it is within bounds.
pub(crate) fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(prefix);
    match usize::try_from(len) {
        Ok(len) if (1..=MAX_FRAME).contains(&len) => Ok(len),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is outside 1..={MAX_FRAME}"),
        )),
    }
}

/// Reads one frame.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    reader.read_exact(&mut prefix).await?;
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

/// Writes one frame, length and message in one write (one TCP segment for any request: a
/// separate 4-byte write went out alone, and Nagle's algorithm could hold the message back until
/// it was acknowledged), and flushes it.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len >= 1 && usize::try_from(len).is_ok_and(|l| l <= MAX_FRAME))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes is outside 1..={MAX_FRAME}", body.len()),
            )
        })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame).await?;
    writer.flush().await
}
