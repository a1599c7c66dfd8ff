//! The `nakshatra` node: everything that touches llama.cpp or the data
//! directory. The binary in `main.rs` is a thin CLI over this library;
//! `docs/ARCHITECTURE.md` maps the modules.

pub mod api;
pub mod ask;
pub mod choose;
pub mod datadir;
pub mod engine;
pub mod faults;
pub mod fetch;
pub mod hop;
pub mod layers;
pub mod net;
pub mod placement;
pub mod serve;
pub mod slices;
pub mod status;
pub mod trace;
pub mod vocab;
