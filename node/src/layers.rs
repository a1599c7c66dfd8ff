//! Parsing layer ranges (`A..B`) and split points (`C1,C2,...`).

use std::ops::Range;

/// Why a layer range or a list of split points is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayersError {
    /// No `..` in it.
    #[error("expected a layer range like 0..10, got {0:?}")]
    NotARange(String),
    /// The start is not a layer number.
    #[error("bad range start in {0:?}")]
    BadStart(String),
    /// The end is not a layer number.
    #[error("bad range end in {0:?}")]
    BadEnd(String),
    /// The end is not past the start.
    #[error("empty layer range {0}..{1}: the end must be greater than the start")]
    Empty(u32, u32),
    /// Split points out of order or outside the model.
    #[error("split points must be increasing and inside 1..{n_layers}, got {cuts:?}")]
    BadSplit {
        /// The split points given.
        cuts: Vec<u32>,
        /// Layers of the model.
        n_layers: u32,
    },
}

/// Parses `A..B` (half-open, as in Rust) into a range of layers.
pub fn parse_range(s: &str) -> Result<Range<u32>, LayersError> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| LayersError::NotARange(s.into()))?;
    let a: u32 = a
        .trim()
        .parse()
        .map_err(|_| LayersError::BadStart(s.into()))?;
    let b: u32 = b
        .trim()
        .parse()
        .map_err(|_| LayersError::BadEnd(s.into()))?;
    if a >= b {
        return Err(LayersError::Empty(a, b));
    }
    Ok(a..b)
}

/// Turns split points `C1,C2,...` into the ranges `0..C1, C1..C2, ..., Ck..n`.
pub fn split_ranges(cuts: &[u32], n_layers: u32) -> Result<Vec<Range<u32>>, LayersError> {
    let mut ranges = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        if c <= start || c >= n_layers {
            return Err(LayersError::BadSplit {
                cuts: cuts.to_vec(),
                n_layers,
            });
        }
        ranges.push(start..c);
        start = c;
    }
    ranges.push(start..n_layers);
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0..10"), Ok(0..10));
        assert_eq!(parse_range(" 3 .. 7 "), Ok(3..7));
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("7..3").is_err());
        assert!(parse_range("7").is_err());
        assert!(parse_range("a..3").is_err());
        assert!(parse_range("-1..3").is_err());
    }

    #[test]
    fn splits() {
        assert_eq!(split_ranges(&[10, 20], 30), Ok(vec![0..10, 10..20, 20..30]));
        let whole = split_ranges(&[], 30).unwrap();
        assert_eq!((whole.len(), whole[0].clone()), (1, 0..30));
        assert!(split_ranges(&[0], 30).is_err());
        assert!(split_ranges(&[30], 30).is_err());
        assert!(split_ranges(&[20, 10], 30).is_err());
        assert!(split_ranges(&[10, 10], 30).is_err());
    }
}
