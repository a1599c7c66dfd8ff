//! A small synthetic qwen2 model that exercises what SmolLM2 does not: an
//! untied head with `output.bias`, a global `rope_freqs.weight`, per-layer
//! metadata arrays, no `{arch}.vocab_size` key, a 64-byte alignment, and two
//! layers with identical weights.

use std::path::Path;

use nakshatra_slicer::{write_gguf, MetaArray, MetaValue, NewTensor, TensorData};

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn floats(seed: f32, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (seed + i as f32).to_le_bytes())
        .collect()
}

/// 3 layers; layers 0 and 2 have identical weights.
pub fn write_model(path: &Path) {
    let meta = vec![
        kv("general.architecture", MetaValue::String("qwen2".into())),
        kv("general.alignment", MetaValue::U32(64)),
        kv("qwen2.block_count", MetaValue::U32(3)),
        kv("qwen2.embedding_length", MetaValue::U32(4)),
        kv(
            "qwen2.feed_forward_length",
            MetaValue::Array(MetaArray::U32(vec![10, 11, 12])),
        ),
        kv(
            "qwen2.attention.head_count",
            MetaValue::Array(MetaArray::I32(vec![1, 2, 3])),
        ),
        kv(
            "qwen2.rope.dimension_sections",
            MetaValue::Array(MetaArray::I32(vec![7, 8, 9])),
        ),
        kv("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(
                ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
            )),
        ),
        kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::String(vec!["a b".into()])),
        ),
        kv("qwen2.context_length", MetaValue::U32(128)),
        kv("tokenizer.chat_template", MetaValue::String("{{x}}".into())),
    ];
    let embd = floats(100.0, 20);
    let rope = floats(200.0, 2);
    let norm = floats(300.0, 4);
    let head = floats(400.0, 20);
    let bias = floats(500.0, 5);
    let layer = [floats(0.0, 4), floats(10.0, 4), floats(0.0, 4)];
    let layer_b = [floats(1.0, 4), floats(11.0, 4), floats(1.0, 4)];
    let t = |name: String, dims: Vec<u64>, data: &'static [u8]| NewTensor {
        name,
        ggml_type: 0,
        dims,
        data: TensorData::Bytes(data),
    };
    let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    let mut tensors = vec![
        t("token_embd.weight".into(), vec![4, 5], leak(embd)),
        t("rope_freqs.weight".into(), vec![2], leak(rope)),
    ];
    for i in 0..3 {
        tensors.push(t(
            format!("blk.{i}.attn_norm.weight"),
            vec![4],
            leak(layer[i].clone()),
        ));
        tensors.push(t(
            format!("blk.{i}.attn_q.bias"),
            vec![4],
            leak(layer_b[i].clone()),
        ));
    }
    tensors.push(t("output_norm.weight".into(), vec![4], leak(norm)));
    tensors.push(t("output.weight".into(), vec![4, 5], leak(head)));
    tensors.push(t("output.bias".into(), vec![5], leak(bias)));
    let mut f = std::fs::File::create(path).unwrap();
    write_gguf(&mut f, &meta, &tensors).unwrap();
}
