//! Small synthetic models, and what a peer serves of them: the model
//! GGUF, its vocabulary-only GGUF, its manifest and model hashes, all
//! valid (built by the slicer and checked with `Manifest::verify`). They
//! are the seeds of the file decoders' fuzz targets; nothing here needs
//! the test model.

use std::path::Path;
use std::sync::OnceLock;

use nakshatra_slicer::{
    manifest_and_vocab, write_gguf, Manifest, MetaArray, MetaValue, ModelHashes, NewTensor,
    TensorData,
};

/// One synthetic model and what a peer would serve of it.
#[derive(Debug)]
pub struct Fixture {
    /// The model id (64 hex).
    pub model_id: String,
    /// The whole model GGUF (metadata, tensors and data).
    pub model_gguf: Vec<u8>,
    /// The vocabulary-only GGUF (`vocab_gguf`).
    pub vocab: Vec<u8>,
    /// The verified manifest.
    pub manifest: Manifest,
    /// The model hashes the vocabulary verifies with.
    pub hashes: ModelHashes,
}

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn floats(seed: f32, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (seed + i as f32).to_le_bytes())
        .collect()
}

/// A model of `arch` with `n_layers` layers, `n_embd` 4, `n_vocab` tokens,
/// tied embeddings or an untied head with `output.bias`.
fn write_model(path: &Path, arch: &str, n_layers: u32, n_vocab: usize, tied: bool) {
    let n_embd = 4usize;
    let tokens: Vec<String> = (0..n_vocab).map(|i| format!("tok{i}")).collect();
    let meta = vec![
        kv("general.architecture", MetaValue::String(arch.into())),
        kv("general.name", MetaValue::String("fuzz".into())),
        kv(&format!("{arch}.block_count"), MetaValue::U32(n_layers)),
        kv(
            &format!("{arch}.embedding_length"),
            MetaValue::U32(n_embd as u32),
        ),
        kv(
            &format!("{arch}.feed_forward_length"),
            MetaValue::Array(MetaArray::U32((0..n_layers).map(|i| 10 + i).collect())),
        ),
        kv(&format!("{arch}.context_length"), MetaValue::U32(128)),
        kv(&format!("{arch}.rope.freq_base"), MetaValue::F32(10_000.0)),
        kv("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(tokens)),
        ),
        kv(
            "tokenizer.ggml.scores",
            MetaValue::Array(MetaArray::F32((0..n_vocab).map(|i| i as f32).collect())),
        ),
        kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(vec![1; n_vocab])),
        ),
        kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::String(vec!["t o".into(), "to k".into()])),
        ),
        kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
        kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)),
        kv(
            "tokenizer.chat_template",
            MetaValue::String("{% for m in messages %}{{m.content}}{% endfor %}".into()),
        ),
        kv(
            "tokenizer.ggml.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U8(vec![1, 2]),
                MetaArray::Bool(vec![true]),
            ])),
        ),
    ];
    let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    let t = |name: String, dims: Vec<u64>, data: Vec<u8>| NewTensor {
        name,
        ggml_type: 0,
        dims,
        data: TensorData::Bytes(leak(data)),
    };
    let mut tensors = vec![
        t(
            "token_embd.weight".into(),
            vec![n_embd as u64, n_vocab as u64],
            floats(100.0, n_embd * n_vocab),
        ),
        t("rope_freqs.weight".into(), vec![2], floats(200.0, 2)),
    ];
    for i in 0..n_layers {
        let f = i as f32;
        tensors.push(t(
            format!("blk.{i}.attn_norm.weight"),
            vec![n_embd as u64],
            floats(f, n_embd),
        ));
        tensors.push(t(
            format!("blk.{i}.attn_q.weight"),
            vec![n_embd as u64, n_embd as u64],
            floats(10.0 + f, n_embd * n_embd),
        ));
    }
    tensors.push(t(
        "output_norm.weight".into(),
        vec![n_embd as u64],
        floats(300.0, n_embd),
    ));
    if !tied {
        tensors.push(t(
            "output.weight".into(),
            vec![n_embd as u64, n_vocab as u64],
            floats(400.0, n_embd * n_vocab),
        ));
        tensors.push(t(
            "output.bias".into(),
            vec![n_vocab as u64],
            floats(500.0, n_vocab),
        ));
    }
    let mut f = std::fs::File::create(path).expect("create the synthetic model");
    write_gguf(&mut f, &meta, &tensors).expect("write the synthetic model");
}

/// The synthetic models (a tied llama of 3 layers, an untied qwen2 of 2),
/// built once per test binary.
pub fn fixtures() -> &'static [Fixture] {
    static CELL: OnceLock<Vec<Fixture>> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        [("llama", 3, 40, true), ("qwen2", 2, 24, false)]
            .iter()
            .map(|&(arch, n_layers, n_vocab, tied)| {
                let path = dir.path().join(format!("{arch}.gguf"));
                write_model(&path, arch, n_layers, n_vocab, tied);
                let (manifest, vocab) = manifest_and_vocab(&path).expect("a valid manifest");
                Fixture {
                    model_id: manifest.model_id.clone(),
                    model_gguf: std::fs::read(&path).expect("read the model back"),
                    hashes: manifest.hashes(),
                    vocab,
                    manifest,
                }
            })
            .collect()
    })
}
