//! A hostile stream for the async frame readers: given bytes, then a long
//! run of filler bytes that costs nothing to hold, delivered in uneven
//! chunks, with spurious wake-ups, ending at EOF or with an I/O error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use arbitrary::{Result, Unstructured};
use futures::AsyncRead;

/// How a [`Stream`] delivers its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Filler bytes after the given ones (never held in memory).
    pub filler: usize,
    /// Value of each filler byte.
    pub filler_byte: u8,
    /// Largest chunk one read returns (at least 1).
    pub max_chunk: usize,
    /// Every `pending_every`-th read first returns `Pending` (0: never).
    pub pending_every: u32,
    /// Whether the stream ends with an I/O error rather than EOF.
    pub fail_at_end: bool,
}

impl Shape {
    /// A random shape whose filler is at most `max_filler` bytes (biased
    /// towards the interesting sizes around `near`: a cap, a growth step).
    pub fn arbitrary(u: &mut Unstructured<'_>, max_filler: usize, near: &[usize]) -> Result<Shape> {
        let filler = match u.int_in_range(0..=3u8)? {
            0 => 0,
            1 => u.int_in_range(0..=4096)?,
            2 => {
                let n = near
                    .get(u.choose_index(near.len().max(1))?)
                    .copied()
                    .unwrap_or(0);
                let delta = u.int_in_range(0..=2usize)?;
                (n + delta).saturating_sub(1)
            }
            _ => u.int_in_range(0..=max_filler)?,
        }
        .min(max_filler);
        Ok(Shape {
            filler,
            filler_byte: u.arbitrary()?,
            max_chunk: *u.choose(&[1usize, 3, 7, 64, 4096, 65_536, 1 << 20, usize::MAX])?,
            pending_every: *u.choose(&[0u32, 0, 2, 5])?,
            fail_at_end: u.ratio(1, 4)?,
        })
    }
}

/// The stream: `given` bytes, then `shape.filler` filler bytes.
#[derive(Debug)]
pub struct Stream<'a> {
    given: &'a [u8],
    shape: Shape,
    /// Bytes delivered so far.
    pos: usize,
    /// Reads so far (for `pending_every`).
    reads: u32,
}

impl<'a> Stream<'a> {
    /// A stream of `given` then filler, delivered as `shape` says.
    pub fn new(given: &'a [u8], shape: Shape) -> Self {
        Stream {
            given,
            shape,
            pos: 0,
            reads: 0,
        }
    }

    /// Total bytes the stream delivers.
    pub fn len(&self) -> usize {
        self.given.len() + self.shape.filler
    }

    /// Whether the stream delivers no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes delivered so far.
    pub fn delivered(&self) -> usize {
        self.pos
    }
}

impl AsyncRead for Stream<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        me.reads = me.reads.wrapping_add(1);
        if me.shape.pending_every != 0 && me.reads.is_multiple_of(me.shape.pending_every) {
            // A spurious Pending: wake at once, as a socket with more data
            // would.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let total = me.len();
        if me.pos >= total {
            return Poll::Ready(if me.shape.fail_at_end {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            } else {
                Ok(0)
            });
        }
        let n = buf.len().min(total - me.pos).min(me.shape.max_chunk.max(1));
        let given = me.given.get(me.pos..).unwrap_or_default();
        let from_given = given.len().min(n);
        buf[..from_given].copy_from_slice(&given[..from_given]);
        buf[from_given..n].fill(me.shape.filler_byte);
        me.pos += n;
        Poll::Ready(Ok(n))
    }
}
