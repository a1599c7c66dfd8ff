//! A counting global allocator: how much one decode call allocates on its
//! own thread.
//!
//! [`CountingAlloc`] is a thin wrapper over [`System`]. A fuzz test binary
//! installs it:
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: nakshatra_fuzz::CountingAlloc = nakshatra_fuzz::CountingAlloc;
//! ```
//!
//! and wraps each decode in [`measure`], which reports the largest single
//! allocation and the peak of live bytes (allocated minus freed, counting
//! only what happened on this thread inside the window). Other threads
//! (tests run in parallel) are not counted, and nothing is counted outside
//! a window.
//!
//! A request larger than [`HARD_LIMIT`] inside a window is refused (the
//! process then aborts, as it would on a real out-of-memory), after the
//! input being decoded is written to stderr in hex, so that even an abort
//! names the bytes that caused it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;

/// The largest single allocation a decode may ask for before the
/// allocator refuses it (and the process aborts, input printed). Far
/// above every cap the fuzz targets assert, far below what would swap.
pub const HARD_LIMIT: usize = 1 << 30;

/// Counters of the current thread's window.
#[derive(Clone, Copy)]
struct Counters {
    /// Whether a window is open on this thread.
    on: bool,
    /// Bytes allocated minus bytes freed since the window opened (may go
    /// negative when memory from before the window is freed).
    live: isize,
    /// Highest `live` seen in the window.
    peak: isize,
    /// Largest single allocation (or reallocation's new size).
    largest: usize,
    /// The input being decoded, for the report before an abort.
    input: (*const u8, usize),
}

const IDLE: Counters = Counters {
    on: false,
    live: 0,
    peak: 0,
    largest: 0,
    input: (std::ptr::null(), 0),
};

thread_local! {
    // `const`-initialised and `Copy`: no lazy initialisation and no
    // destructor, so reading it never allocates (which would recurse).
    static COUNTERS: Cell<Counters> = const { Cell::new(IDLE) };
}

/// What one window allocated on its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Largest single allocation, bytes.
    pub largest: usize,
    /// Peak of live bytes (allocated and not yet freed) during the
    /// window, bytes.
    pub peak: usize,
}

/// The counting allocator (see the module doc). Install it with
/// `#[global_allocator]` in a test binary; without a window it only
/// forwards to [`System`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

/// Records an allocation of `size` bytes (and `freed` bytes given back by
/// a reallocation) in the open window; `false` if it must be refused.
fn on_alloc(size: usize, freed: usize) -> bool {
    COUNTERS
        .try_with(|c| {
            let mut k = c.get();
            if !k.on {
                return true;
            }
            if size > HARD_LIMIT {
                // Close the window first: reporting must not count (or
                // refuse) anything it might allocate itself.
                c.set(Counters { on: false, ..k });
                report_refusal(size, k.input);
                return false;
            }
            k.largest = k.largest.max(size);
            k.live = k
                .live
                .saturating_add_unsigned(size)
                .saturating_sub_unsigned(freed);
            k.peak = k.peak.max(k.live);
            c.set(k);
            true
        })
        .unwrap_or(true)
}

/// Records `size` bytes freed in the open window.
fn on_free(size: usize) {
    let _ = COUNTERS.try_with(|c| {
        let mut k = c.get();
        if k.on {
            k.live = k.live.saturating_sub_unsigned(size);
            c.set(k);
        }
    });
}

/// Writes "refused N bytes; input: <hex>" to stderr without allocating
/// (fixed stack buffer; `Stderr` is unbuffered).
fn report_refusal(size: usize, (ptr, len): (*const u8, usize)) {
    let mut err = std::io::stderr();
    let mut line = [0u8; 160];
    let mut cur = std::io::Cursor::new(&mut line[..]);
    let _ = write!(
        cur,
        "\nnakshatra-fuzz: a decode asked for {size} bytes (hard limit {HARD_LIMIT}); input ({len} bytes, hex):\n"
    );
    let n = cur.position() as usize;
    let _ = err.write_all(line.get(..n).unwrap_or_default());
    if ptr.is_null() {
        return;
    }
    // SAFETY: `ptr`/`len` were taken from a live `&[u8]` by `measure`,
    // which keeps that borrow alive for the whole window this call is in.
    let input = unsafe { std::slice::from_raw_parts(ptr, len) };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for chunk in input.chunks(64) {
        let mut out = [0u8; 129];
        for (i, b) in chunk.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        out[2 * chunk.len()] = b'\n';
        let _ = err.write_all(out.get(..2 * chunk.len() + 1).unwrap_or_default());
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and
// pointer unchanged, so `System`'s guarantees (alignment, size, validity)
// are the caller's; the bookkeeping around the calls only touches a
// `const`-initialised thread-local `Cell` of a `Copy` type (which never
// allocates, so it cannot recurse) and never unwinds. A refused request
// returns null, which `GlobalAlloc` permits.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout, which satisfies
        // `GlobalAlloc::alloc`'s contract (non-zero size) by the caller's
        // own obligation.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size(), 0) {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`,
        // with `layout` (the caller's obligation).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !on_alloc(new_size, layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` with `layout`, and
        // `new_size` meets `realloc`'s contract (the caller's obligation).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` in a counting window on this thread and returns what it
/// returned (or its panic) with what it allocated. `input` is what `f`
/// decodes; it is only read if an allocation over [`HARD_LIMIT`] is about
/// to abort the process. Windows do not nest.
pub fn measure<R>(input: &[u8], f: impl FnOnce() -> R) -> (std::thread::Result<R>, Usage) {
    COUNTERS.with(|c| {
        c.set(Counters {
            on: true,
            input: (input.as_ptr(), input.len()),
            ..IDLE
        })
    });
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let k = COUNTERS.with(|c| c.replace(IDLE));
    let usage = Usage {
        largest: k.largest,
        peak: usize::try_from(k.peak).unwrap_or(0),
    };
    (r, usage)
}

/// Whether the counting allocator is installed: a window sees its own
/// allocations. A target calls this once, so a test binary that forgot
/// `#[global_allocator]` fails instead of passing with nothing counted.
pub fn installed() -> bool {
    let (_, u) = measure(&[], || std::hint::black_box(vec![0u8; 1000]));
    u.largest >= 1000
}
