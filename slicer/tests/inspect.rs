//! `inspect` and `Gguf::open` on the real test model.

mod common;

use nakshatra_slicer::{inspect, Gguf, MetaArray, MetaValue, ModelInfo};

#[test]
fn inspect_smollm2() {
    let info = inspect(&common::model_path()).unwrap();
    assert_eq!(info.arch, "llama");
    assert_eq!(info.n_layers, 30);
    assert_eq!(info.n_embd, 576);
    assert_eq!(info.n_vocab, 49152);
    assert!(info.tied_embeddings);
    assert_eq!(info.head_hash, None);
    assert_eq!(info.slice, None);
    assert_eq!(info.file_bytes, 98_362_432);
    assert_eq!(info.block_hashes.len(), 30);
    assert_eq!(info.block_bytes.len(), 30);
    assert!(info.block_bytes.iter().all(|&b| b == info.block_bytes[0]));
    // 2 F32 norms + 7 Q4_1 matrices per layer.
    assert_eq!(info.block_bytes[0], 2_216_448);
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex(&info.id));
    assert!(hex(&info.embd_hash) && hex(&info.globals_hash));
    assert!(info.block_hashes.iter().all(|h| hex(h)));
    // Different layers have different weights.
    let mut uniq = info.block_hashes.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 30);
}

#[test]
fn id_is_stable_and_independent_of_file_name() {
    let src = common::model_path();
    let a = inspect(&src).unwrap();
    let b = inspect(&src).unwrap();
    assert_eq!(a, b);

    let dir = common::tmp();
    let other = dir.path().join("some-other-name.bin");
    if std::fs::hard_link(&src, &other).is_err() {
        std::fs::copy(&src, &other).unwrap();
    }
    let c = inspect(&other).unwrap();
    assert_eq!(a.id, c.id);
    assert_eq!(a, c);
}

#[test]
fn model_info_serde_round_trip() {
    let info = inspect(&common::model_path()).unwrap();
    let json = serde_json::to_string(&info).unwrap();
    let back: ModelInfo = serde_json::from_str(&json).unwrap();
    assert_eq!(info, back);
}

#[test]
fn gguf_open_real_model() {
    let g = Gguf::open(&common::model_path()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.metadata().len(), 33);
    assert_eq!(g.metadata()[0].0, "general.architecture");
    assert_eq!(
        g.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(g.get("llama.block_count"), Some(&MetaValue::U32(30)));
    assert_eq!(g.get("no.such.key"), None);
    match g.get("tokenizer.ggml.tokens") {
        Some(MetaValue::Array(MetaArray::String(t))) => {
            assert_eq!(t.len(), 49152);
            assert_eq!(t[0], "<|endoftext|>");
        }
        other => panic!("unexpected tokens value {other:?}"),
    }
    assert_eq!(g.tensors().len(), 272);
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, 8); // Q8_0
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.offset, g.data_offset());
    assert_eq!(embd.type_info().map(|t| t.name), Some("Q8_0"));
    assert!(g.tensor("output.weight").is_none());
    let mut prev_end = 0;
    for t in g.tensors() {
        assert_eq!(g.tensor_data(t).len() as u64, t.n_bytes, "{}", t.name);
        assert_eq!(t.offset % 32, 0);
        assert!(t.offset >= prev_end);
        prev_end = t.offset + t.n_bytes;
    }
    assert!(prev_end <= g.file_len());
}
