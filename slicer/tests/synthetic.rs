//! Slicing a small synthetic qwen2 model that exercises what SmolLM2 does
//! not: an untied head with `output.bias`, a global `rope_freqs.weight`,
//! per-layer metadata arrays, no `{arch}.vocab_size` key, a 64-byte
//! alignment, and two layers with identical weights.

mod common;

use common::qwen2::write_model;
use nakshatra_slicer::{inspect, write_slice, Gguf, MetaArray, MetaValue};

fn keys(g: &Gguf) -> Vec<&str> {
    g.metadata().iter().map(|(k, _)| k.as_str()).collect()
}

fn names(g: &Gguf) -> Vec<&str> {
    g.tensors().iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn qwen2_untied_with_bias() {
    let dir = common::tmp();
    let src = dir.path().join("qwen2.gguf");
    write_model(&src);
    let info = inspect(&src).unwrap();
    assert_eq!((info.n_layers, info.n_embd, info.n_vocab), (3, 4, 5));
    assert!(!info.tied_embeddings);
    assert!(info.head_hash.is_some());
    // Identical weights at layers 0 and 2 hash equal.
    assert_eq!(info.block_hashes[0], info.block_hashes[2]);
    assert_ne!(info.block_hashes[0], info.block_hashes[1]);
    let g = Gguf::open(&src).unwrap();

    // First slice: no vocab, no head, dummy embedding, sidecar.
    let out = write_slice(&src, 0, 1, &dir.path().join("s0.gguf")).unwrap();
    let s = Gguf::open(&out.path).unwrap();
    assert_eq!(s.alignment(), 64);
    assert!(s.tensors().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(
        keys(&s),
        [
            "general.architecture",
            "general.alignment",
            "qwen2.block_count",
            "qwen2.vocab_size",
            "qwen2.embedding_length",
            "qwen2.feed_forward_length",
            "qwen2.attention.head_count",
            "qwen2.rope.dimension_sections",
            "tokenizer.ggml.model",
            "qwen2.context_length",
            "nakshatra.source_model_id",
            "nakshatra.layer_start",
            "nakshatra.layer_end",
            "nakshatra.n_layers_total",
            "nakshatra.format_version",
        ]
    );
    assert_eq!(s.get("qwen2.block_count"), Some(&MetaValue::U32(1)));
    assert_eq!(s.get("qwen2.vocab_size"), Some(&MetaValue::U32(1)));
    assert_eq!(
        s.get("qwen2.feed_forward_length"),
        Some(&MetaValue::Array(MetaArray::U32(vec![10])))
    );
    assert_eq!(
        s.get("qwen2.attention.head_count"),
        Some(&MetaValue::Array(MetaArray::I32(vec![1])))
    );
    // Not a per-layer array, even though its length is 3.
    assert_eq!(
        s.get("qwen2.rope.dimension_sections"),
        g.get("qwen2.rope.dimension_sections")
    );
    assert_eq!(
        names(&s),
        [
            "token_embd.weight",
            "rope_freqs.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.bias",
            "output_norm.weight"
        ]
    );
    let e = s.tensor("token_embd.weight").unwrap();
    assert_eq!((e.ggml_type, e.dims.as_slice()), (0, [4u64, 1].as_slice()));
    assert!(out.embd_sidecar.is_some());
    assert_eq!(out.info.head_hash, None);
    assert!(out.info.tied_embeddings);
    // The slice's globals are output_norm + rope_freqs, without output.bias.
    assert_ne!(out.info.globals_hash, info.globals_hash);

    // Middle slice.
    let out = write_slice(&src, 1, 2, &dir.path().join("s1.gguf")).unwrap();
    let s = Gguf::open(&out.path).unwrap();
    assert_eq!(out.embd_sidecar, None);
    assert_eq!(
        s.get("qwen2.feed_forward_length"),
        Some(&MetaValue::Array(MetaArray::U32(vec![11])))
    );
    assert_eq!(
        s.tensor_data(s.tensor("rope_freqs.weight").unwrap()),
        g.tensor_data(g.tensor("rope_freqs.weight").unwrap())
    );
    assert_eq!(
        s.tensor_data(s.tensor("blk.0.attn_norm.weight").unwrap()),
        g.tensor_data(g.tensor("blk.1.attn_norm.weight").unwrap())
    );
    assert_eq!(out.info.block_hashes, info.block_hashes[1..2]);

    // Last slice: everything non-block kept, vocab untouched.
    let out = write_slice(&src, 1, 3, &dir.path().join("s2.gguf")).unwrap();
    let s = Gguf::open(&out.path).unwrap();
    assert_eq!(out.embd_sidecar, None);
    assert!(s.get("qwen2.vocab_size").is_none());
    for k in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
    ] {
        assert_eq!(s.get(k), g.get(k), "{k}");
    }
    assert_eq!(
        s.get("qwen2.attention.head_count"),
        Some(&MetaValue::Array(MetaArray::I32(vec![2, 3])))
    );
    assert_eq!(
        names(&s),
        [
            "token_embd.weight",
            "rope_freqs.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.bias",
            "blk.1.attn_norm.weight",
            "blk.1.attn_q.bias",
            "output_norm.weight",
            "output.weight",
            "output.bias"
        ]
    );
    for n in ["token_embd.weight", "output.weight", "output.bias"] {
        assert_eq!(
            s.tensor_data(s.tensor(n).unwrap()),
            g.tensor_data(g.tensor(n).unwrap())
        );
    }
    assert_eq!(out.info.head_hash, info.head_hash);
    assert_eq!(out.info.embd_hash, info.embd_hash);
    assert_eq!(out.info.globals_hash, info.globals_hash);
    assert_eq!(out.info.n_vocab, 5);
    assert_eq!(out.info.block_hashes, info.block_hashes[1..3]);
    assert!(!out.info.tied_embeddings);

    // The whole range is the same content, hence the same id.
    let out = write_slice(&src, 0, 3, &dir.path().join("all.gguf")).unwrap();
    assert_eq!(out.info.id, info.id);
    assert_eq!(out.embd_sidecar, None);
}
