//! Fuzzing of every decoder that reads bytes from a peer or from a peer's
//! file, on stable Rust, as ordinary (time-budgeted) integration tests.
//!
//! The targets live in `tests/`: `wire.rs` (protocol messages, signed
//! records and blobs, DHT keys, the info protocol's codec), `frames.rs`
//! (the node's length-prefixed frame readers and payload decoders) and
//! `files.rs` (the GGUF parser, the vocabulary check, the manifest chain
//! and the piece hasher). Each target asserts, for every input:
//!
//! - **no panic**: the decoder runs under `catch_unwind`, and a panic
//!   fails the test with the input in hex ([`harness::check`]);
//! - **no allocation beyond the caps**: a counting global allocator
//!   ([`alloc::CountingAlloc`]) measures the largest single allocation and
//!   the peak of live bytes of the decode call on its own thread, and each
//!   target states the decoder's cap (a frame's limit, the record size,
//!   bincode's decode limit, a multiple of a file's length);
//! - **no abort**: an allocation over [`alloc::HARD_LIMIT`] prints the
//!   input before the process aborts.
//!
//! Inputs come from [`arbtest`] (random bytes, growing in size, with a
//! replayable seed: `ARBTEST_SEED=0x...`), turned into either plain bytes
//! or valid encodings ([`gen`], [`model`]) mutated by [`mutate`]. Each
//! target runs for [`harness::budget`] (`NAKSHATRA_FUZZ_SECS`, default
//! [`harness::DEFAULT_BUDGET_SECS`]): a short run in CI, a long one with
//!
//! ```sh
//! NAKSHATRA_FUZZ_SECS=600 cargo test --release -p nakshatra-fuzz \
//!     --features nakshatra/fault-injection -- --nocapture
//! ```
//!
//! Inputs that once failed are kept as regression tests next to their
//! target.

pub mod alloc;
pub mod gen;
pub mod harness;
pub mod model;
pub mod mutate;
pub mod stream;

pub use alloc::CountingAlloc;
pub use harness::{check, fuzz, Cap, Stats};
