//! ggml tensor types: block size and bytes per block, used to compute the
//! byte size of a tensor from its type and shape.
//!
//! The table mirrors `type_traits[]` in ggml's `ggml.c` (ggml 0.26, as vendored
//! by `llama-cpp-sys-2 0.1.161`); block sizes come from `sizeof(block_*)` in
//! `ggml-common.h`. Ids that ggml has removed (4, 5, 31..=33, 36..=38) and ids
//! past the end of the table are unknown, and reading a tensor with such a
//! type is an error rather than a guess.

/// Size information for one ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlTypeInfo {
    /// The numeric id stored in GGUF tensor infos (`enum ggml_type`).
    pub id: u32,
    /// ggml's name for the type, e.g. `"Q4_1"`.
    pub name: &'static str,
    /// Number of elements in one block (1 for plain scalar types).
    pub block_size: u64,
    /// Number of bytes in one block.
    pub type_size: u64,
}

const fn t(id: u32, name: &'static str, block_size: u64, type_size: u64) -> GgmlTypeInfo {
    GgmlTypeInfo {
        id,
        name,
        block_size,
        type_size,
    }
}

/// Every ggml type that can appear in a GGUF file, by id.
const TYPES: &[GgmlTypeInfo] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 36),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
    t(42, "Q2_0", 64, 18),
];

/// The ggml type id of `F32`.
pub const GGML_TYPE_F32: u32 = 0;

/// Looks up a ggml type by its numeric id; `None` for ids ggml does not know
/// (or no longer supports in GGUF files).
pub fn ggml_type_info(id: u32) -> Option<&'static GgmlTypeInfo> {
    TYPES.iter().find(|t| t.id == id)
}

/// Why a tensor's byte size could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SizeError {
    UnknownType(u32),
    /// The first dimension is not a multiple of the type's block size.
    NotBlockAligned {
        ne0: u64,
        block_size: u64,
    },
    /// Element count or byte size does not fit in 63 bits.
    Overflow,
}

impl std::fmt::Display for SizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeError::UnknownType(t) => write!(f, "unknown ggml type id {t}"),
            SizeError::NotBlockAligned { ne0, block_size } => write!(
                f,
                "row length {ne0} is not a multiple of its type's block size {block_size}"
            ),
            SizeError::Overflow => write!(f, "the shape is too large"),
        }
    }
}

/// Byte size of a tensor of type `ggml_type` and shape `dims` (ggml order:
/// `dims[0]` is the contiguous row length), with the same rules as ggml's
/// GGUF loader: every dimension and the element count must fit in an `i64`,
/// and `dims[0]` must be a multiple of the block size.
pub(crate) fn tensor_n_bytes(ggml_type: u32, dims: &[u64]) -> Result<u64, SizeError> {
    let info = ggml_type_info(ggml_type).ok_or(SizeError::UnknownType(ggml_type))?;
    const MAX: u64 = i64::MAX as u64;
    let mut n_elements: u64 = 1;
    for &d in dims {
        if d > MAX {
            return Err(SizeError::Overflow);
        }
        n_elements = n_elements
            .checked_mul(d)
            .filter(|&n| n <= MAX)
            .ok_or(SizeError::Overflow)?;
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % info.block_size != 0 {
        return Err(SizeError::NotBlockAligned {
            ne0,
            block_size: info.block_size,
        });
    }
    (n_elements / info.block_size)
        .checked_mul(info.type_size)
        .filter(|&n| n <= MAX)
        .ok_or(SizeError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_are_unique_and_sane() {
        for (i, a) in TYPES.iter().enumerate() {
            assert!(a.block_size > 0 && a.type_size > 0, "{}", a.name);
            for b in &TYPES[i + 1..] {
                assert_ne!(a.id, b.id);
                assert_ne!(a.name, b.name);
            }
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000, u32::MAX] {
            assert!(ggml_type_info(removed).is_none(), "{removed}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(tensor_n_bytes(0, &[576, 1]), Ok(2304));
        // Q4_1: 32 elements in 20 bytes.
        assert_eq!(tensor_n_bytes(3, &[576, 49152]), Ok(576 / 32 * 20 * 49152));
        assert_eq!(tensor_n_bytes(12, &[256, 2]), Ok(288));
        assert_eq!(tensor_n_bytes(0, &[]), Ok(4));
        assert_eq!(
            tensor_n_bytes(2, &[33]),
            Err(SizeError::NotBlockAligned {
                ne0: 33,
                block_size: 32
            })
        );
        assert_eq!(tensor_n_bytes(99, &[1]), Err(SizeError::UnknownType(99)));
        assert_eq!(
            tensor_n_bytes(0, &[1 << 40, 1 << 40]),
            Err(SizeError::Overflow)
        );
        assert_eq!(tensor_n_bytes(0, &[u64::MAX]), Err(SizeError::Overflow));
        assert_eq!(tensor_n_bytes(0, &[1 << 62]), Err(SizeError::Overflow));
    }
}
