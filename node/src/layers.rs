//! Parsing layer ranges (`A..B`) and split points (`C1,C2,...`).

use std::ops::Range;

/// Parses `A..B` (half-open, as in Rust) into a range of layers.
pub fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected a layer range like 0..10, got {s:?}"))?;
    let a: u32 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad range start in {s:?}"))?;
    let b: u32 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad range end in {s:?}"))?;
    if a >= b {
        return Err(format!(
            "empty layer range {a}..{b}: the end must be greater than the start"
        ));
    }
    Ok(a..b)
}

/// Turns split points `C1,C2,...` into the ranges `0..C1, C1..C2, ..., Ck..n`.
pub fn split_ranges(cuts: &[u32], n_layers: u32) -> Result<Vec<Range<u32>>, String> {
    let mut ranges = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        if c <= start || c >= n_layers {
            return Err(format!(
                "split points must be increasing and inside 1..{n_layers}, got {cuts:?}"
            ));
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
