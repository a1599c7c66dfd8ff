//! Inputs built from random bytes: a valid encoding (a seed) mutated a few
//! times, a seed as is, or plain random bytes.
//!
//! The mutations are the ones length-prefixed formats are weak against:
//! truncation, extension, bit flips, spliced and repeated ranges, and
//! "interesting" integers (0, 1, limits, powers of two, the input's own
//! length ± 1) written over any offset as 1, 2, 4 or 8 bytes little or big
//! endian, or as a bincode varint (`251` + u16, `252` + u32, `253` + u64).

use arbitrary::{Result, Unstructured};

/// Integers written over seeds.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    250,
    251,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x10_0000,
    0x100_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// An input for a decoder whose valid encodings include `seeds`: one of
/// them mutated (most often), as is, or random bytes, at most `max_len`
/// bytes long.
pub fn input(u: &mut Unstructured<'_>, seeds: &[Vec<u8>], max_len: usize) -> Result<Vec<u8>> {
    let pick = u.int_in_range(0..=9u8)?;
    if seeds.is_empty() || pick == 0 {
        let n = u.int_in_range(0..=max_len.min(u.len()))?;
        return Ok(u.bytes(n)?.to_vec());
    }
    let seed = u.choose(seeds)?.clone();
    if pick == 1 {
        return Ok(seed);
    }
    let n = u.int_in_range(1..=4u8)?;
    let mut out = seed;
    for _ in 0..n {
        mutate(u, &mut out, seeds)?;
    }
    out.truncate(max_len);
    Ok(out)
}

/// Applies one random mutation to `b` (`seeds` give splice material).
pub fn mutate(u: &mut Unstructured<'_>, b: &mut Vec<u8>, seeds: &[Vec<u8>]) -> Result<()> {
    let at = |u: &mut Unstructured<'_>, len: usize| u.int_in_range(0..=len);
    match u.int_in_range(0..=9u8)? {
        // Truncate.
        0 => {
            let n = at(u, b.len())?;
            b.truncate(n);
        }
        // Flip a bit.
        1 if !b.is_empty() => {
            let i = at(u, b.len() - 1)?;
            let bit = u.int_in_range(0..=7u8)?;
            b[i] ^= 1 << bit;
        }
        // A random byte.
        2 if !b.is_empty() => {
            let i = at(u, b.len() - 1)?;
            b[i] = u.arbitrary()?;
        }
        // An interesting integer, fixed width.
        3 | 4 => {
            let v = interesting(u, b.len())?;
            let width = *u.choose(&[1usize, 2, 4, 8])?;
            let mut bytes = v.to_le_bytes();
            if u.arbitrary()? {
                bytes.reverse();
                bytes.copy_within(8 - width.., 0);
            }
            let i = at(u, b.len())?;
            overwrite(b, i, bytes.get(..width).unwrap_or_default());
        }
        // An interesting integer as a bincode varint.
        5 => {
            let v = interesting(u, b.len())?;
            let i = at(u, b.len())?;
            overwrite(b, i, &varint(v, u.int_in_range(0..=3u8)?));
        }
        // Insert random bytes.
        6 => {
            let i = at(u, b.len())?;
            let n = u.int_in_range(1..=16usize)?;
            let ins: Vec<u8> = u.bytes(n.min(u.len()))?.to_vec();
            b.splice(i..i, ins);
        }
        // Delete a range.
        7 if !b.is_empty() => {
            let i = at(u, b.len() - 1)?;
            let n = u.int_in_range(1..=(b.len() - i).min(64))?;
            b.drain(i..i + n);
        }
        // Repeat a range (a list that claims more elements than it has,
        // or has more than it claims).
        8 if !b.is_empty() => {
            let i = at(u, b.len() - 1)?;
            let n = u.int_in_range(1..=(b.len() - i).min(256))?;
            let times = u.int_in_range(1..=8usize)?;
            let piece = b[i..i + n].to_vec();
            for _ in 0..times {
                b.splice(i..i, piece.iter().copied());
            }
        }
        // Splice in part of another seed.
        _ => {
            let other = u.choose(seeds)?;
            if !other.is_empty() {
                let from = at(u, other.len() - 1)?;
                let n = u.int_in_range(1..=(other.len() - from))?;
                let i = at(u, b.len())?;
                overwrite(b, i, &other[from..from + n]);
            }
        }
    }
    Ok(())
}

/// One of [`INTERESTING`], the input's length ± 1, or a random value.
fn interesting(u: &mut Unstructured<'_>, len: usize) -> Result<u64> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => (len as u64).wrapping_sub(1),
        1 => len as u64,
        2 => len as u64 + 1,
        3 => u.arbitrary()?,
        _ => *u.choose(INTERESTING)?,
    })
}

/// `v` as bincode writes integers: one byte below 251, else a marker and
/// 2, 4 or 8 little-endian bytes. `form` 1..=3 forces the 2-, 4- or
/// 8-byte form (non-canonical for small values), 0 picks the canonical
/// one.
pub fn varint(v: u64, form: u8) -> Vec<u8> {
    let form = match form {
        0 if v < 251 => 0,
        0 if v <= 0xffff => 1,
        0 if v <= 0xffff_ffff => 2,
        0 => 3,
        f => f.min(3),
    };
    match form {
        0 => vec![v as u8],
        1 => [&[251u8][..], &(v as u16).to_le_bytes()].concat(),
        2 => [&[252u8][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &v.to_le_bytes()].concat(),
    }
}

/// Writes `bytes` at `at`, growing `b` when they run past its end.
fn overwrite(b: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let end = at + bytes.len();
    if b.len() < end {
        b.resize(end, 0);
    }
    b[at..end].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_forms() {
        assert_eq!(varint(5, 0), vec![5]);
        assert_eq!(varint(300, 0), vec![251, 44, 1]);
        assert_eq!(varint(5, 2), vec![252, 5, 0, 0, 0]);
        assert_eq!(varint(u64::MAX, 0), [vec![253], vec![0xff; 8]].concat());
    }

    #[test]
    fn mutations_never_panic() {
        let seeds = vec![vec![1, 2, 3, 4, 5], vec![], vec![9; 40]];
        arbtest::arbtest(|u| {
            let _ = input(u, &seeds, 100)?;
            Ok(())
        })
        .budget_ms(200);
    }
}
