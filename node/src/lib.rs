//! The `nakshatra` node: the engine that runs a range of a model's layers on
//! llama.cpp, the local slice cache, and (in later crates' terms) serving and
//! asking. The binary in `main.rs` is a thin CLI over this library.

#![warn(missing_docs)]

pub mod ask;
pub mod engine;
pub mod fetch;
pub mod hop;
pub mod layers;
pub mod net;
pub mod serve;
pub mod slices;
pub mod status;
