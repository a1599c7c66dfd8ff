//! Vocabulary files: `vocab_gguf` builds them, `verify_vocab` checks them
//! against the model id; any change to what the id covers is caught.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use nakshatra_slicer::{
    embd_sidecar_path, inspect, verify_vocab, vocab_gguf, write_gguf, write_slice, Gguf, GgufError,
    MetaArray, MetaValue, ModelHashes, ModelInfo, NewTensor, SliceError, TensorData, VocabInfo,
    VOCAB_ROLE,
};

/// The SmolLM2 model's info and vocabulary file, computed once.
fn smol() -> &'static (ModelInfo, Vec<u8>) {
    static CELL: OnceLock<(ModelInfo, Vec<u8>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let src = common::model_path();
        let info = inspect(&src).unwrap();
        let vocab = vocab_gguf(&src).unwrap();
        (info, vocab)
    })
}

fn smol_expected() -> VocabInfo {
    VocabInfo {
        arch: "llama".into(),
        n_layers: 30,
        n_embd: 576,
        n_vocab: 49152,
        name: "smollm2:135m-8k-lc100k-mix1-ep2-q4_1".into(),
    }
}

type Meta = Vec<(String, MetaValue)>;

fn metadata_of(bytes: &[u8]) -> Meta {
    Gguf::from_bytes(bytes.to_vec(), "test")
        .unwrap()
        .metadata()
        .to_vec()
}

fn encode(meta: &Meta, tensors: &[NewTensor<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    write_gguf(&mut out, meta, tensors).unwrap();
    out
}

/// The SmolLM2 vocabulary with its metadata changed by `f`, re-encoded.
fn tampered(f: impl FnOnce(&mut Meta)) -> Vec<u8> {
    let mut meta = metadata_of(&smol().1);
    f(&mut meta);
    encode(&meta, &[])
}

fn value_mut<'a>(meta: &'a mut Meta, key: &str) -> &'a mut MetaValue {
    &mut meta
        .iter_mut()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no key {key}"))
        .1
}

fn verify_smol(bytes: &[u8]) -> Result<VocabInfo, SliceError> {
    let (info, _) = smol();
    verify_vocab(bytes, &info.id, &info.into())
}

fn assert_id_mismatch(r: Result<VocabInfo, SliceError>) {
    let id = &smol().0.id;
    match r {
        Err(SliceError::IdMismatch { expected, got }) => {
            assert_eq!(&expected, id);
            assert_ne!(&got, id);
            assert_eq!(got.len(), 64);
        }
        other => panic!("expected IdMismatch, got {other:?}"),
    }
}

#[test]
fn round_trip_smollm2() {
    let src = common::model_path();
    let (info, vocab) = smol();
    println!(
        "SmolLM2-135M-Instruct vocabulary file: {} bytes",
        vocab.len()
    );
    let got = verify_vocab(vocab, &info.id, &ModelHashes::from(info)).unwrap();
    assert_eq!(got, smol_expected());
    assert_eq!(
        (got.n_layers, got.n_embd, got.n_vocab),
        (info.n_layers, info.n_embd, info.n_vocab)
    );

    // All the source metadata, same order and values, then our three keys;
    // no tensors.
    let model = Gguf::open(&src).unwrap();
    let v = Gguf::from_bytes(vocab.clone(), "vocab").unwrap();
    assert!(v.tensors().is_empty());
    assert_eq!(v.version(), 3);
    assert_eq!(v.file_len(), vocab.len() as u64);
    let n = model.metadata().len();
    assert_eq!(v.metadata().len(), n + 3);
    assert_eq!(&v.metadata()[..n], model.metadata());
    let tail: Vec<&str> = v.metadata()[n..].iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        tail,
        [
            "nakshatra.role",
            "nakshatra.source_model_id",
            "nakshatra.format_version"
        ]
    );
    assert_eq!(
        v.get("nakshatra.role"),
        Some(&MetaValue::String(VOCAB_ROLE.into()))
    );
    assert_eq!(
        v.get("nakshatra.source_model_id"),
        Some(&MetaValue::String(info.id.clone()))
    );
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
    ] {
        assert_eq!(v.get(key), model.get(key), "{key}");
        assert!(v.get(key).is_some(), "{key}");
    }
    // Tokenizer metadata only: far smaller than the model.
    assert!(vocab.len() < 4 << 20, "{}", vocab.len());

    // The hashes survive a JSON round trip (they travel between peers).
    let h = ModelHashes::from(info);
    let json = serde_json::to_string(&h).unwrap();
    let back: ModelHashes = serde_json::from_str(&json).unwrap();
    assert_eq!(back, h);
    assert_eq!(verify_vocab(vocab, &info.id, &back).unwrap(), got);
}

#[test]
fn deterministic() {
    let src = common::model_path();
    let (_, vocab) = smol();
    assert_eq!(&vocab_gguf(&src).unwrap(), vocab);
    // Independent of the file name.
    let dir = common::tmp();
    let other = dir.path().join("renamed.bin");
    if std::fs::hard_link(&src, &other).is_err() {
        std::fs::copy(&src, &other).unwrap();
    }
    assert_eq!(&vocab_gguf(&other).unwrap(), vocab);
}

#[test]
fn re_encoding_unchanged_metadata_still_verifies() {
    // The tamper tests below re-encode with `write_gguf`; unchanged, that is
    // byte-identical and verifies.
    let bytes = tampered(|_| {});
    assert_eq!(&bytes, &smol().1);
    assert_eq!(verify_smol(&bytes).unwrap(), smol_expected());
}

#[test]
fn tampered_merge_is_rejected() {
    let bytes = tampered(|m| match value_mut(m, "tokenizer.ggml.merges") {
        MetaValue::Array(MetaArray::String(merges)) => {
            assert!(merges.len() > 1000);
            merges.swap(10, 11);
        }
        v => panic!("merges: {v:?}"),
    });
    assert_id_mismatch(verify_smol(&bytes));

    let bytes = tampered(|m| match value_mut(m, "tokenizer.ggml.merges") {
        MetaValue::Array(MetaArray::String(merges)) => merges[100].push('x'),
        v => panic!("merges: {v:?}"),
    });
    assert_id_mismatch(verify_smol(&bytes));
}

#[test]
fn tampered_chat_template_is_rejected() {
    let bytes = tampered(|m| match value_mut(m, "tokenizer.chat_template") {
        MetaValue::String(t) => {
            assert!(t.contains("im_start"), "{t}");
            *t = t.replacen("assistant", "assistent", 1);
        }
        v => panic!("chat template: {v:?}"),
    });
    assert_id_mismatch(verify_smol(&bytes));
    // One byte appended.
    let bytes = tampered(|m| match value_mut(m, "tokenizer.chat_template") {
        MetaValue::String(t) => t.push(' '),
        v => panic!("chat template: {v:?}"),
    });
    assert_id_mismatch(verify_smol(&bytes));
}

#[test]
fn other_tampering_is_rejected() {
    // A token's text.
    assert_id_mismatch(verify_smol(&tampered(|m| {
        match value_mut(m, "tokenizer.ggml.tokens") {
            MetaValue::Array(MetaArray::String(t)) => t[500] = "evil".into(),
            v => panic!("tokens: {v:?}"),
        }
    })));
    // A special token id.
    assert_id_mismatch(verify_smol(&tampered(|m| {
        let v = value_mut(m, "tokenizer.ggml.eos_token_id");
        let id = v.as_u32().unwrap();
        *v = MetaValue::U32(id + 1);
    })));
    // The same number with another integer type.
    assert_id_mismatch(verify_smol(&tampered(|m| {
        let v = value_mut(m, "tokenizer.ggml.eos_token_id");
        let id = v.as_u64().unwrap();
        *v = match v {
            MetaValue::U32(_) => MetaValue::U64(id),
            _ => MetaValue::U32(id as u32),
        };
    })));
    // A hyperparameter.
    assert_id_mismatch(verify_smol(&tampered(|m| {
        let v = value_mut(m, "llama.context_length");
        *v = MetaValue::U32(v.as_u32().unwrap() * 2);
    })));
    // A key added (a different chat template under a second name).
    assert_id_mismatch(verify_smol(&tampered(|m| {
        m.insert(
            5,
            (
                "tokenizer.chat_template.tool_use".into(),
                MetaValue::String("{{ evil }}".into()),
            ),
        );
    })));
    // A key removed.
    assert_id_mismatch(verify_smol(&tampered(|m| {
        m.retain(|(k, _)| k != "tokenizer.chat_template");
    })));
    // Block count changed: no longer fits the hashes.
    let r = verify_smol(&tampered(|m| {
        *value_mut(m, "llama.block_count") = MetaValue::U32(29);
    }));
    assert!(matches!(r, Err(SliceError::BadHashes(_))), "{r:?}");
}

#[test]
fn key_order_and_general_keys_are_not_content() {
    // Documented: the id covers neither key order nor `general.*`.
    let bytes = tampered(|m| {
        m.reverse();
        m.retain(|(k, _)| k != "general.name");
        m.push(("general.name".into(), MetaValue::String("renamed".into())));
    });
    assert_ne!(&bytes, &smol().1);
    assert_eq!(verify_smol(&bytes).unwrap(), smol_expected());
}

#[test]
fn wrong_hashes_are_rejected() {
    let (info, vocab) = smol();
    let good = ModelHashes::from(info);
    let flip = |h: &str| {
        let mut b = h.as_bytes().to_vec();
        b[7] = if b[7] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };

    let mut h = good.clone();
    h.block_hashes[17] = flip(&h.block_hashes[17]);
    assert_id_mismatch(verify_vocab(vocab, &info.id, &h));

    let mut h = good.clone();
    h.block_hashes.swap(0, 1);
    assert_id_mismatch(verify_vocab(vocab, &info.id, &h));

    let mut h = good.clone();
    h.embd_hash = flip(&h.embd_hash);
    assert_id_mismatch(verify_vocab(vocab, &info.id, &h));

    let mut h = good.clone();
    h.globals_hash = flip(&h.globals_hash);
    assert_id_mismatch(verify_vocab(vocab, &info.id, &h));

    // SmolLM2 has a tied head: claiming an untied one changes the id.
    let mut h = good.clone();
    h.head_hash = Some(good.embd_hash.clone());
    assert_id_mismatch(verify_vocab(vocab, &info.id, &h));

    // Right hashes, wrong id.
    let other = flip(&info.id);
    let e = verify_vocab(vocab, &other, &good).unwrap_err();
    match &e {
        SliceError::IdMismatch { expected, got } => {
            assert_eq!(expected, &other);
            assert_eq!(got, &info.id);
        }
        e => panic!("{e:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&other) && msg.contains(&info.id) && msg.contains("does not belong"),
        "{msg}"
    );
}

#[test]
fn wrong_block_count_in_hashes_is_rejected() {
    let (info, vocab) = smol();
    let good = ModelHashes::from(info);

    let mut h = good.clone();
    h.block_hashes.pop();
    let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
    assert!(matches!(e, SliceError::BadHashes(_)), "{e:?}");
    assert!(e.to_string().contains("30"), "{e}");

    let mut h = good.clone();
    h.block_hashes.pop();
    h.n_layers = 29;
    let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
    assert!(matches!(e, SliceError::BadHashes(_)), "{e:?}");

    let mut h = good.clone();
    h.n_layers = 31;
    let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
    assert!(matches!(e, SliceError::BadHashes(_)), "{e:?}");

    let mut h = good.clone();
    h.block_hashes.push(good.block_hashes[0].clone());
    let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
    assert!(matches!(e, SliceError::BadHashes(_)), "{e:?}");

    // Malformed hex.
    for bad in [
        "",
        "xyz",
        &good.embd_hash[..63],
        &good.embd_hash.to_uppercase(),
    ] {
        let mut h = good.clone();
        h.embd_hash = bad.to_string();
        let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
        assert!(matches!(e, SliceError::BadHashes(_)), "{bad:?}: {e:?}");
        assert!(e.to_string().contains("embd_hash"), "{e}");
    }
    let mut h = good.clone();
    h.block_hashes[3] = "é".repeat(100);
    let e = verify_vocab(vocab, &info.id, &h).unwrap_err();
    assert!(e.to_string().contains("block_hashes[3]"), "{e}");
}

#[test]
fn garbage_and_truncated_bytes_are_errors() {
    let (info, vocab) = smol();
    let h = ModelHashes::from(info);
    let id = &info.id;

    let e = verify_vocab(&[], id, &h).unwrap_err();
    assert!(
        matches!(e, SliceError::Gguf(GgufError::NotGguf { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("vocabulary of model"), "{e}");

    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let garbage: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
    assert!(verify_vocab(&garbage, id, &h).is_err());
    let mut fake = b"GGUF\x03\0\0\0".to_vec();
    fake.extend(&garbage);
    assert!(verify_vocab(&fake, id, &h).is_err());

    // Every short prefix, then prefixes spread over the whole file.
    let mut cuts: Vec<usize> = (0..512).collect();
    cuts.extend((0..300).map(|_| rnd() as usize % vocab.len()));
    cuts.push(vocab.len() - 1);
    for cut in cuts {
        let e = verify_vocab(&vocab[..cut], id, &h).unwrap_err();
        assert!(matches!(e, SliceError::Gguf(_)), "cut at {cut}: {e:?}");
    }

    // Random byte changes: an error, or (a byte inside a `general.*` value
    // or a `nakshatra.*` key's value) a result that is still right.
    for _ in 0..300 {
        let mut b = vocab.clone();
        let i = rnd() as usize % b.len();
        b[i] ^= (rnd() as u8) | 1;
        if let Ok(v) = verify_vocab(&b, id, &h) {
            assert_eq!(v, smol_expected(), "byte {i}");
        }
    }
}

#[test]
fn vocab_file_structure_is_checked() {
    let (info, vocab) = smol();
    let meta = metadata_of(vocab);

    // Tensors are not allowed.
    let data = [0u8; 16];
    let t = NewTensor {
        name: "token_embd.weight".into(),
        ggml_type: 0,
        dims: vec![4],
        data: TensorData::Bytes(&data),
    };
    let e = verify_smol(&encode(&meta, &[t])).unwrap_err();
    assert!(matches!(e, SliceError::BadVocab(_)), "{e:?}");
    assert!(e.to_string().contains("tensors"), "{e}");

    // The role must be "vocab".
    let mut m = meta.clone();
    m.retain(|(k, _)| k != "nakshatra.role");
    let e = verify_smol(&encode(&m, &[])).unwrap_err();
    assert!(matches!(e, SliceError::BadVocab(_)), "{e:?}");
    let mut m = meta.clone();
    *value_mut(&mut m, "nakshatra.role") = MetaValue::String("token_embd".into());
    let e = verify_smol(&encode(&m, &[])).unwrap_err();
    assert!(e.to_string().contains("token_embd"), "{e}");

    // The source id label must agree (it is outside the id, so checked on
    // its own).
    let mut m = meta.clone();
    *value_mut(&mut m, "nakshatra.source_model_id") = MetaValue::String("0".repeat(64));
    let e = verify_smol(&encode(&m, &[])).unwrap_err();
    assert!(matches!(e, SliceError::BadVocab(_)), "{e:?}");
    assert!(e.to_string().contains(&info.id), "{e}");

    // No vocabulary at all: n_vocab cannot be derived.
    let mut m = meta.clone();
    m.retain(|(k, _)| k != "tokenizer.ggml.tokens" && k != "llama.vocab_size");
    let e = verify_smol(&encode(&m, &[])).unwrap_err();
    assert!(
        matches!(&e, SliceError::MissingKey(k) if k == "tokenizer.ggml.tokens"),
        "{e:?}"
    );
}

#[test]
fn slices_and_derived_files_are_refused() {
    let src = common::model_path();
    let (info, vocab) = smol();
    let dir = common::tmp();

    let check = |path: &Path| {
        let e = vocab_gguf(path).unwrap_err();
        match &e {
            SliceError::NotOriginalModel { path: p, source_id } => {
                assert_eq!(p, path);
                assert_eq!(source_id, &info.id);
            }
            e => panic!("{}: {e:?}", path.display()),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("original model") && msg.contains(&info.id),
            "{msg}"
        );
    };

    // A last slice carries the tokenizer, but not the source's metadata.
    let last = write_slice(&src, 20, 30, &dir.path().join("last.gguf")).unwrap();
    check(&last.path);
    let first = write_slice(&src, 0, 10, &dir.path().join("first.gguf")).unwrap();
    check(&first.path);
    check(&embd_sidecar_path(&first.path));
    // A vocabulary file is not a model either.
    let v = dir.path().join("vocab.gguf");
    std::fs::write(&v, vocab).unwrap();
    check(&v);
}

// --- A small synthetic model: no `{arch}.vocab_size`, untied head. ---

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn floats(seed: f32, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (seed + i as f32).to_le_bytes())
        .collect()
}

fn write_synthetic(path: &Path, with_tokens: bool) {
    let mut meta = vec![
        kv("general.architecture", MetaValue::String("qwen2".into())),
        kv("general.alignment", MetaValue::U32(64)),
        kv("qwen2.block_count", MetaValue::U64(2)),
        kv("qwen2.embedding_length", MetaValue::U32(4)),
        kv(
            "qwen2.feed_forward_length",
            MetaValue::Array(MetaArray::U32(vec![10, 11])),
        ),
        kv("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
    ];
    if with_tokens {
        meta.push(kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(
                ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec(),
            )),
        ));
        meta.push(kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::String(vec!["a b".into()])),
        ));
    }
    meta.push(kv(
        "tokenizer.chat_template",
        MetaValue::String("{{x}}".into()),
    ));
    let bufs = [
        floats(100.0, 20),
        floats(1.0, 4),
        floats(2.0, 4),
        floats(3.0, 4),
        floats(4.0, 20),
    ];
    fn t<'a>(name: &str, dims: Vec<u64>, data: &'a [u8]) -> NewTensor<'a> {
        NewTensor {
            name: name.into(),
            ggml_type: 0,
            dims,
            data: TensorData::Bytes(data),
        }
    }
    // token_embd is [4, 5]: 5 rows, but 6 tokens: n_vocab comes from the
    // tokens, as in `inspect`.
    let tensors = [
        t("token_embd.weight", vec![4, 5], &bufs[0]),
        t("blk.0.attn_norm.weight", vec![4], &bufs[1]),
        t("blk.1.attn_norm.weight", vec![4], &bufs[2]),
        t("output_norm.weight", vec![4], &bufs[3]),
        t("output.weight", vec![4, 5], &bufs[4]),
    ];
    let mut f = std::fs::File::create(path).unwrap();
    write_gguf(&mut f, &meta, &tensors).unwrap();
}

#[test]
fn synthetic_untied_model_round_trip() {
    let dir = common::tmp();
    let src = dir.path().join("qwen2.gguf");
    write_synthetic(&src, true);
    let info = inspect(&src).unwrap();
    assert_eq!(info.n_vocab, 6);
    assert!(info.head_hash.is_some());
    let vocab = vocab_gguf(&src).unwrap();
    let got = verify_vocab(&vocab, &info.id, &(&info).into()).unwrap();
    assert_eq!(
        got,
        VocabInfo {
            arch: "qwen2".into(),
            n_layers: 2,
            n_embd: 4,
            n_vocab: 6,
            name: "qwen2".into(),
        }
    );
    // Without tensors, the data section is empty: no padding.
    let g = Gguf::from_bytes(vocab.clone(), "v").unwrap();
    assert_eq!(g.data_offset(), vocab.len() as u64);
    assert_eq!(g.alignment(), 64);

    // The head hash matters.
    let mut h = ModelHashes::from(&info);
    h.head_hash = None;
    assert!(matches!(
        verify_vocab(&vocab, &info.id, &h),
        Err(SliceError::IdMismatch { .. })
    ));

    // Every truncation of the whole file is an error, never a panic.
    for cut in 0..vocab.len() {
        assert!(
            Gguf::from_bytes(vocab[..cut].to_vec(), "v").is_err(),
            "{cut}"
        );
        assert!(verify_vocab(&vocab[..cut], &info.id, &h).is_err(), "{cut}");
    }
    // Every single-byte change: an error or a still-correct result.
    let good = ModelHashes::from(&info);
    for i in 0..vocab.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = vocab.clone();
            b[i] ^= x;
            if let Ok(v) = verify_vocab(&b, &info.id, &good) {
                assert_eq!(v, got, "byte {i} ^ {x:#x}");
            }
        }
    }
}

#[test]
fn model_without_tokens_is_refused() {
    let dir = common::tmp();
    let src = dir.path().join("no-tokens.gguf");
    write_synthetic(&src, false);
    // `inspect` falls back to token_embd's shape; a vocabulary file could
    // not, so none is made.
    assert_eq!(inspect(&src).unwrap().n_vocab, 5);
    let e = vocab_gguf(&src).unwrap_err();
    assert!(
        matches!(&e, SliceError::MissingKey(k) if k == "tokenizer.ggml.tokens"),
        "{e:?}"
    );
}
