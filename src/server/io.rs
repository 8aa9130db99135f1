//! The one way this shell reads from a socket: append to a `BytesMut`, having reserved room
//! for what the framer says is still missing (a big bulk is read into one allocation).

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Smallest free space offered to a read.
const MIN_READ: usize = 16 * 1024;

/// Read more bytes onto the end of `buf`, with at least `max(hint, 16 KiB)` spare room.
/// Returns the read's result and the buffer (monoio owns it while the read is in flight).
pub(crate) async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    mut buf: BytesMut,
    hint: usize,
) -> (std::io::Result<usize>, BytesMut) {
    let want = hint.max(MIN_READ);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    let len = buf.len();
    let (res, slice) = rd.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}
