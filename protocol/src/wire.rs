//! The one bincode configuration every nakshatra message uses, and size
//! limited decoding.

use serde::{de::DeserializeOwned, Serialize};

use crate::RecordError;

/// Upper bound bincode may claim while decoding any one message (it bounds
/// allocations driven by length prefixes read from the wire): the bytes
/// of every decoded integer, string and byte string count against it, so
/// a message whose decoded fields add up to more is refused, whatever
/// `max` [`decode`] is given.
pub const DECODE_LIMIT: usize = 1 << 20;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` with nakshatra's bincode configuration (bincode 2,
/// `standard()`: little endian, variable-length integers).
///
/// Encoding plain data types (the ones in this crate) does not fail; the
/// `Result` is there for foreign types whose `Serialize` impl may.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RecordError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| RecordError::Malformed(format!("encode: {e}")))
}

/// Decodes a `T` from exactly `bytes`, refusing input longer than `max`
/// bytes (before looking at it) and input with trailing bytes. Never panics,
/// whatever the bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, RecordError> {
    if bytes.len() > max {
        return Err(RecordError::TooLarge {
            size: bytes.len(),
            max,
        });
    }
    let cfg = config().with_limit::<DECODE_LIMIT>();
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(bytes, cfg)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    if read != bytes.len() {
        return Err(RecordError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - read
        )));
    }
    Ok(value)
}
