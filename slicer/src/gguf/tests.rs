//! Reader/writer round trips and hostile-input tests on in-memory files.

use std::path::Path;

use super::read::parse;
use super::value::{MetaArray, MetaValue};
use super::write::{write_gguf, NewTensor, TensorData};
use crate::error::GgufError;

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn every_kind_of_value() -> Vec<(String, MetaValue)> {
    vec![
        kv("general.architecture", MetaValue::String("llama".into())),
        kv("a.u8", MetaValue::U8(200)),
        kv("a.i8", MetaValue::I8(-5)),
        kv("a.u16", MetaValue::U16(60000)),
        kv("a.i16", MetaValue::I16(-30000)),
        kv("a.u32", MetaValue::U32(4_000_000_000)),
        kv("a.i32", MetaValue::I32(-2_000_000_000)),
        kv("a.u64", MetaValue::U64(u64::MAX)),
        kv("a.i64", MetaValue::I64(i64::MIN)),
        kv("a.f32", MetaValue::F32(1.5)),
        kv("a.f64", MetaValue::F64(-2.25)),
        kv("a.bool", MetaValue::Bool(true)),
        kv("a.str", MetaValue::String("héllo".into())),
        kv("a.empty", MetaValue::String(String::new())),
        kv("arr.u8", MetaValue::Array(MetaArray::U8(vec![1, 2, 3]))),
        kv("arr.i8", MetaValue::Array(MetaArray::I8(vec![-1, 2]))),
        kv("arr.u16", MetaValue::Array(MetaArray::U16(vec![1, 65535]))),
        kv("arr.i16", MetaValue::Array(MetaArray::I16(vec![-1]))),
        kv("arr.u32", MetaValue::Array(MetaArray::U32(vec![7; 5]))),
        kv("arr.i32", MetaValue::Array(MetaArray::I32(vec![-7, 3]))),
        kv("arr.u64", MetaValue::Array(MetaArray::U64(vec![1 << 40]))),
        kv("arr.i64", MetaValue::Array(MetaArray::I64(vec![-1 << 40]))),
        kv(
            "arr.f32",
            MetaValue::Array(MetaArray::F32(vec![0.5, -0.25])),
        ),
        kv("arr.f64", MetaValue::Array(MetaArray::F64(vec![1e300]))),
        kv(
            "arr.bool",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        ),
        kv(
            "arr.str",
            MetaValue::Array(MetaArray::String(vec!["a".into(), "".into(), "ü".into()])),
        ),
        kv("arr.empty", MetaValue::Array(MetaArray::F32(vec![]))),
        kv(
            "arr.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U32(vec![1, 2]),
                MetaArray::String(vec!["x".into()]),
            ])),
        ),
    ]
}

const DATA_A: [u8; 16] = [1; 16];
const DATA_C: [u8; 36] = [3; 36];

fn tensors() -> Vec<NewTensor<'static>> {
    vec![
        NewTensor {
            name: "a".into(),
            ggml_type: 0,
            dims: vec![4],
            data: TensorData::Bytes(&DATA_A),
        },
        NewTensor {
            name: "b".into(),
            ggml_type: 0,
            dims: vec![3, 1],
            data: TensorData::Zeros,
        },
        // Q8_0, one block of 32 elements in 34 bytes.
        NewTensor {
            name: "c".into(),
            ggml_type: 8,
            dims: vec![32, 1, 1, 1],
            data: TensorData::Bytes(&DATA_C[..34]),
        },
    ]
}

fn sample_file() -> Vec<u8> {
    let mut out = Vec::new();
    let n = write_gguf(&mut out, &every_kind_of_value(), &tensors()).unwrap();
    assert_eq!(n as usize, out.len());
    out
}

fn p() -> &'static Path {
    Path::new("test.gguf")
}

#[test]
fn round_trip() {
    let bytes = sample_file();
    let parsed = parse(&bytes, p()).unwrap();
    assert_eq!(parsed.version, 3);
    assert_eq!(parsed.alignment, 32);
    assert_eq!(parsed.metadata, every_kind_of_value());
    assert_eq!(parsed.data_offset % 32, 0);
    let names: Vec<&str> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = &parsed.tensors[0];
    assert_eq!((a.offset, a.n_bytes), (parsed.data_offset, 16));
    assert_eq!(&bytes[a.offset as usize..][..16], &DATA_A);
    let b = &parsed.tensors[1];
    assert_eq!((b.offset, b.n_bytes), (parsed.data_offset + 32, 12));
    assert!(bytes[b.offset as usize..][..12].iter().all(|&x| x == 0));
    let c = &parsed.tensors[2];
    assert_eq!((c.offset, c.n_bytes), (parsed.data_offset + 64, 34));
    assert_eq!(c.dims, vec![32, 1, 1, 1]);
    // The last tensor is padded too, like ggml does.
    assert_eq!(bytes.len() as u64, parsed.data_offset + 64 + 64);
    // Writing the parsed content again gives the same bytes.
    let again = {
        let t: Vec<NewTensor<'_>> = parsed
            .tensors
            .iter()
            .map(|t| NewTensor {
                name: t.name.clone(),
                ggml_type: t.ggml_type,
                dims: t.dims.clone(),
                data: TensorData::Bytes(&bytes[t.offset as usize..][..t.n_bytes as usize]),
            })
            .collect();
        let mut out = Vec::new();
        write_gguf(&mut out, &parsed.metadata, &t).unwrap();
        out
    };
    assert_eq!(again, bytes);
}

#[test]
fn custom_alignment_and_no_tensors() {
    let meta = vec![kv("general.alignment", MetaValue::U32(64))];
    let mut out = Vec::new();
    write_gguf(&mut out, &meta, &tensors()).unwrap();
    let parsed = parse(&out, p()).unwrap();
    assert_eq!(parsed.alignment, 64);
    assert!(parsed.tensors.iter().all(|t| t.offset % 64 == 0));

    let mut out = Vec::new();
    write_gguf(&mut out, &meta, &[]).unwrap();
    let parsed = parse(&out, p()).unwrap();
    assert!(parsed.tensors.is_empty());
    assert_eq!(parsed.data_offset, out.len() as u64);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_file();
    let parsed = parse(&bytes, p()).unwrap();
    let data_end = parsed
        .tensors
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    for cut in 0..bytes.len() {
        let r = parse(&bytes[..cut], p());
        if cut < 4 {
            assert!(
                matches!(r, Err(GgufError::NotGguf { .. })),
                "cut {cut}: {r:?}"
            );
        } else if (cut as u64) < data_end {
            assert!(
                matches!(r, Err(GgufError::Truncated { .. })),
                "cut {cut}: {r:?}"
            );
        } else {
            // Only trailing padding is missing: still a complete file.
            assert!(r.is_ok(), "cut {cut}: {r:?}");
        }
    }
}

/// A tiny xorshift generator, to mutate files without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mutated_files_never_panic() {
    let bytes = sample_file();
    // Flip every byte of the header, metadata and tensor infos.
    let data_offset = parse(&bytes, p()).unwrap().data_offset as usize;
    for i in 0..data_offset {
        for x in [0xff, 0x80, 0x01] {
            let mut b = bytes.clone();
            b[i] ^= x;
            let _ = parse(&b, p());
        }
    }
    // Random multi-byte mutations, and random garbage.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() % data_offset as u64) as usize;
            b[i] = rng.next() as u8;
        }
        let _ = parse(&b, p());
    }
    for len in 0..300 {
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 4 {
            b[..4].copy_from_slice(b"GGUF");
        }
        if len >= 8 {
            b[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        let _ = parse(&b, p());
    }
}

/// A header with `n_tensors` and `n_kv`, followed by `rest`.
fn raw(version: u32, n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(rest);
    b
}

fn gguf_str(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s);
    b
}

/// One metadata entry `key` with raw type tag and payload.
fn raw_kv(key: &str, tag: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = gguf_str(key.as_bytes());
    b.extend(tag.to_le_bytes());
    b.extend(payload);
    b
}

#[test]
fn huge_lengths_do_not_allocate() {
    // Key length 2^60.
    let r = parse(&raw(3, 0, 1, &(1u64 << 60).to_le_bytes()), p());
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    // u64::MAX entries and tensors.
    let r = parse(&raw(3, 0, u64::MAX, &[]), p());
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    let r = parse(&raw(3, u64::MAX, 0, &[]), p());
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    // A string value of length 2^60.
    let r = parse(
        &raw(3, 0, 1, &raw_kv("k", 8, &(1u64 << 60).to_le_bytes())),
        p(),
    );
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    // Arrays of 2^62 u64s / strings / arrays.
    for elem in [10u32, 8, 9] {
        let mut payload = elem.to_le_bytes().to_vec();
        payload.extend((1u64 << 62).to_le_bytes());
        let r = parse(&raw(3, 0, 1, &raw_kv("k", 9, &payload)), p());
        assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    }
}

#[test]
fn bad_values() {
    let r = parse(&raw(3, 0, 1, &raw_kv("k", 13, &[0; 8])), p());
    assert!(
        matches!(r, Err(GgufError::UnknownValueType { tag: 13, .. })),
        "{r:?}"
    );
    let r = parse(&raw(3, 0, 1, &raw_kv("k", 7, &[2])), p());
    assert!(
        matches!(r, Err(GgufError::InvalidBool { value: 2, .. })),
        "{r:?}"
    );
    let r = parse(
        &raw(3, 0, 1, &raw_kv("k", 8, &gguf_str(&[0xff, 0xfe]))),
        p(),
    );
    assert!(matches!(r, Err(GgufError::InvalidUtf8 { .. })), "{r:?}");
    let r = parse(&raw(3, 0, 1, &raw_kv("", 0, &[0])), p());
    assert!(matches!(r, Err(GgufError::BadKey { .. })), "{r:?}");
    let mut two = raw_kv("k", 0, &[0]);
    two.extend(raw_kv("k", 0, &[1]));
    let r = parse(&raw(3, 0, 2, &two), p());
    assert!(matches!(r, Err(GgufError::BadKey { .. })), "{r:?}");
    // Arrays nested 9 deep.
    let mut payload = Vec::new();
    for _ in 0..9 {
        payload.extend(9u32.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
    }
    payload.extend(0u32.to_le_bytes());
    payload.extend(0u64.to_le_bytes());
    let r = parse(&raw(3, 0, 1, &raw_kv("k", 9, &payload)), p());
    assert!(matches!(r, Err(GgufError::TooDeep { .. })), "{r:?}");
    // general.alignment of the wrong type, or not a power of two.
    for (tag, payload) in [
        (10u32, 32u64.to_le_bytes().to_vec()),
        (4, 48u32.to_le_bytes().to_vec()),
        (4, vec![0; 4]),
    ] {
        let r = parse(
            &raw(3, 0, 1, &raw_kv("general.alignment", tag, &payload)),
            p(),
        );
        assert!(matches!(r, Err(GgufError::BadAlignment { .. })), "{r:?}");
    }
}

#[test]
fn versions() {
    for v in [0u32, 1, 4, 0x0300_0000] {
        let r = parse(&raw(v, 0, 0, &[]), p());
        assert!(
            matches!(r, Err(GgufError::UnsupportedVersion { version, .. }) if version == v),
            "{r:?}"
        );
    }
    assert!(parse(&raw(2, 0, 0, &[]), p()).is_ok());
    assert!(parse(&raw(3, 0, 0, &[]), p()).is_ok());
    let r = parse(b"GGML\x03\0\0\0", p());
    assert!(matches!(r, Err(GgufError::NotGguf { .. })), "{r:?}");
}

/// A file with one tensor info and `data_len` bytes of (aligned) data.
fn one_tensor(n_dims: u32, dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut info = gguf_str(b"t");
    info.extend(n_dims.to_le_bytes());
    for d in dims {
        info.extend(d.to_le_bytes());
    }
    info.extend(ty.to_le_bytes());
    info.extend(offset.to_le_bytes());
    let mut b = raw(3, 1, 0, &info);
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; data_len]);
    b
}

#[test]
fn bad_tensor_infos() {
    assert!(parse(&one_tensor(1, &[4], 0, 0, 16), p()).is_ok());
    let r = parse(&one_tensor(1, &[4], 0, 0, 15), p());
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    let r = parse(&one_tensor(1, &[4], 99, 0, 16), p());
    assert!(matches!(r, Err(GgufError::UnknownType(99))), "{r:?}");
    let r = parse(&one_tensor(1, &[4], 4, 0, 16), p()); // removed Q4_2
    assert!(matches!(r, Err(GgufError::UnknownType(4))), "{r:?}");
    let r = parse(&one_tensor(5, &[1; 5], 0, 0, 16), p());
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
    let r = parse(&one_tensor(1, &[33], 2, 0, 64), p()); // Q4_0 needs multiples of 32
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
    let r = parse(&one_tensor(1, &[4], 0, 16, 64), p()); // misaligned
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
    let r = parse(&one_tensor(2, &[1 << 40, 1 << 40], 0, 0, 16), p());
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
    let r = parse(&one_tensor(1, &[4], 0, u64::MAX - 31, 16), p());
    assert!(matches!(r, Err(GgufError::Truncated { .. })), "{r:?}");
    let r = parse(&one_tensor(1, &[u64::MAX], 0, 0, 16), p());
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
    // n_dims = u32::MAX must not allocate or loop for long.
    let r = parse(&one_tensor(u32::MAX, &[], 0, 0, 0), p());
    assert!(matches!(r, Err(GgufError::BadTensor { .. })), "{r:?}");
}

#[test]
fn writer_rejects_inconsistent_input() {
    let mut out = Vec::new();
    let bad = [NewTensor {
        name: "t".into(),
        ggml_type: 0,
        dims: vec![4],
        data: TensorData::Bytes(&[0; 15]),
    }];
    assert!(write_gguf(&mut out, &[], &bad).is_err());
    let dup = [kv("k", MetaValue::U8(1)), kv("k", MetaValue::U8(2))];
    assert!(write_gguf(&mut out, &dup, &[]).is_err());
    let align = [kv("general.alignment", MetaValue::U64(32))];
    assert!(write_gguf(&mut out, &align, &[]).is_err());
    let unknown = [NewTensor {
        name: "t".into(),
        ggml_type: 5,
        dims: vec![4],
        data: TensorData::Zeros,
    }];
    assert!(write_gguf(&mut out, &[], &unknown).is_err());
    assert!(
        out.is_empty(),
        "nothing is written before validation passes"
    );
}

#[test]
fn from_bytes_matches_open() {
    let bytes = sample_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let a = super::read::Gguf::open(&path).unwrap();
    let b = super::read::Gguf::from_bytes(bytes.clone(), "in memory").unwrap();
    assert_eq!(b.path(), Path::new("in memory"));
    assert_eq!(a.metadata(), b.metadata());
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(
        (a.version(), a.alignment(), a.data_offset(), a.file_len()),
        (b.version(), b.alignment(), b.data_offset(), b.file_len())
    );
    for t in b.tensors() {
        assert_eq!(a.tensor_data(t), b.tensor_data(t));
        assert_eq!(b.tensor_data(t).len() as u64, t.n_bytes);
    }
    // Same errors as `open`, named after the buffer.
    let e = super::read::Gguf::from_bytes(Vec::new(), "peer data").unwrap_err();
    assert!(matches!(e, GgufError::NotGguf { .. }), "{e:?}");
    assert!(e.to_string().starts_with("peer data is not a GGUF"), "{e}");
    // Cut anywhere before the end of the last tensor's data (the padding
    // after it is optional).
    let data_end = b.tensors().iter().map(|t| t.offset + t.n_bytes).max();
    for cut in 0..data_end.unwrap() as usize {
        assert!(
            super::read::Gguf::from_bytes(bytes[..cut].to_vec(), "x").is_err(),
            "{cut}"
        );
    }
}
