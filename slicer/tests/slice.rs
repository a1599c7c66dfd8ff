//! `write_slice` on the real test model.

mod common;

use std::path::Path;

use nakshatra_slicer::{
    embd_sidecar_path, inspect, write_slice, Gguf, MetaValue, SliceMeta, TensorInfo,
};

/// Writes `start..end` of the test model into `dir` and checks the result
/// against the source.
fn check_slice(dir: &Path, start: u32, end: u32) {
    let src_path = common::model_path();
    let src = Gguf::open(&src_path).unwrap();
    let src_info = inspect(&src_path).unwrap();
    let n = src_info.n_layers;
    let last = end == n;
    let out_path = dir.join(format!("slice-{start}-{end}.gguf"));
    let out = write_slice(&src_path, start, end, &out_path).unwrap();
    assert_eq!(out.path, out_path);

    let g = Gguf::open(&out_path).unwrap();
    let meta = |k: &str| g.get(k).cloned();
    assert_eq!(g.alignment(), src.alignment());
    assert_eq!(meta("llama.block_count"), Some(MetaValue::U32(end - start)));
    assert_eq!(
        meta("nakshatra.source_model_id"),
        Some(MetaValue::String(src_info.id.clone()))
    );
    assert_eq!(meta("nakshatra.layer_start"), Some(MetaValue::U32(start)));
    assert_eq!(meta("nakshatra.layer_end"), Some(MetaValue::U32(end)));
    assert_eq!(meta("nakshatra.n_layers_total"), Some(MetaValue::U32(n)));
    assert_eq!(meta("nakshatra.format_version"), Some(MetaValue::U32(1)));
    // Untouched keys keep their value and relative order.
    for k in [
        "general.name",
        "llama.embedding_length",
        "llama.rope.freq_base",
    ] {
        assert_eq!(meta(k), src.get(k).cloned(), "{k}");
    }
    let order = |g: &Gguf| -> Vec<String> {
        g.metadata()
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("general.") || k.starts_with("llama."))
            .collect()
    };
    // SmolLM2 has llama.vocab_size, so no key is added or moved.
    assert_eq!(order(&g), order(&src));
    let vocab = if last { 49152 } else { 1 };
    assert_eq!(meta("llama.vocab_size"), Some(MetaValue::U32(vocab)));

    // Vocabulary: removed in non-last slices, kept in the last.
    let tokenizer_keys: Vec<&str> = g
        .metadata()
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    if last {
        let src_tok: Vec<(String, MetaValue)> = src
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        let out_tok: Vec<(String, MetaValue)> = g
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        assert_eq!(out_tok, src_tok);
    } else {
        assert_eq!(tokenizer_keys, vec!["tokenizer.ggml.model"]);
        assert_eq!(
            meta("tokenizer.ggml.model"),
            Some(MetaValue::String("none".into()))
        );
    }

    // Tensors: renumbered blocks, byte-identical data, original order.
    let expected: Vec<(String, &TensorInfo)> = src
        .tensors()
        .iter()
        .filter_map(|t| {
            if let Some(rest) = t.name.strip_prefix("blk.") {
                let (i, suffix) = rest.split_once('.').unwrap();
                let i: u32 = i.parse().unwrap();
                return (start..end)
                    .contains(&i)
                    .then(|| (format!("blk.{}.{suffix}", i - start), t));
            }
            Some((t.name.clone(), t))
        })
        .collect();
    let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want_names);
    for (name, s) in &expected {
        let t = g.tensor(name).unwrap();
        if name == "token_embd.weight" && !last {
            assert_eq!(t.ggml_type, 0);
            assert_eq!(t.dims, vec![576, 1]);
            assert!(g.tensor_data(t).iter().all(|&b| b == 0));
            assert_eq!(g.tensor_data(t).len(), 576 * 4);
            continue;
        }
        assert_eq!(t.ggml_type, s.ggml_type, "{name}");
        assert_eq!(t.dims, s.dims, "{name}");
        assert!(g.tensor_data(t) == src.tensor_data(s), "{name} differs");
    }
    assert!(g.tensor("output_norm.weight").is_some());
    assert_eq!(g.tensors().len(), 2 + 9 * (end - start) as usize);

    // Content addressing: same layers, same hashes.
    let info = &out.info;
    assert_eq!(info, &inspect(&out_path).unwrap());
    assert_eq!(info.n_layers, end - start);
    assert_eq!(
        info.block_hashes,
        src_info.block_hashes[start as usize..end as usize]
    );
    assert_eq!(info.globals_hash, src_info.globals_hash);
    assert_eq!(info.n_vocab, if last { 49152 } else { 1 });
    if last {
        assert_eq!(info.embd_hash, src_info.embd_hash);
    } else {
        assert_ne!(info.embd_hash, src_info.embd_hash);
    }
    if (start, end) == (0, n) {
        // Same content as the source: same id (nakshatra.* keys do not count).
        assert_eq!(info.id, src_info.id);
    } else {
        assert_ne!(info.id, src_info.id);
    }
    assert_eq!(
        info.slice,
        Some(SliceMeta {
            source_id: src_info.id.clone(),
            start,
            end,
            n_layers_total: n
        })
    );

    // Sidecar only for a first slice that is not last.
    let sidecar = embd_sidecar_path(&out_path);
    if start == 0 && !last {
        assert_eq!(out.embd_sidecar.as_deref(), Some(sidecar.as_path()));
        let e = Gguf::open(&sidecar).unwrap();
        assert_eq!(e.tensors().len(), 1);
        let t = &e.tensors()[0];
        let s = src.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (t.name.as_str(), t.ggml_type, &t.dims),
            ("token_embd.weight", s.ggml_type, &s.dims)
        );
        assert!(e.tensor_data(t) == src.tensor_data(s));
        assert_eq!(
            e.get("general.architecture").and_then(|v| v.as_str()),
            Some("llama")
        );
        assert_eq!(
            e.get("nakshatra.source_model_id").and_then(|v| v.as_str()),
            Some(src_info.id.as_str())
        );
        assert_eq!(
            e.get("nakshatra.role").and_then(|v| v.as_str()),
            Some("token_embd")
        );
        let size = std::fs::metadata(&sidecar).unwrap().len();
        assert_eq!(out.bytes, info.file_bytes + size);
    } else {
        assert_eq!(out.embd_sidecar, None);
        assert!(!sidecar.exists());
        assert_eq!(out.bytes, info.file_bytes);
    }
    assert_eq!(info.file_bytes, std::fs::metadata(&out_path).unwrap().len());

    // No temporary files left behind.
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(!name.to_string_lossy().contains(".tmp-"), "{name:?}");
    }
}

#[test]
fn slice_0_10() {
    check_slice(common::tmp().path(), 0, 10);
}

#[test]
fn slice_10_20() {
    check_slice(common::tmp().path(), 10, 20);
}

#[test]
fn slice_20_30() {
    check_slice(common::tmp().path(), 20, 30);
}

#[test]
fn slice_0_15() {
    check_slice(common::tmp().path(), 0, 15);
}

#[test]
fn slice_15_30() {
    check_slice(common::tmp().path(), 15, 30);
}

#[test]
fn slice_single_layer() {
    check_slice(common::tmp().path(), 29, 30);
    check_slice(common::tmp().path(), 0, 1);
    check_slice(common::tmp().path(), 7, 8);
}

#[test]
fn full_range_is_an_equivalent_copy() {
    let dir = common::tmp();
    check_slice(dir.path(), 0, 30);
    let src = inspect(&common::model_path()).unwrap();
    let out = inspect(&dir.path().join("slice-0-30.gguf")).unwrap();
    assert_eq!(out.block_hashes, src.block_hashes);
    assert_eq!(out.embd_hash, src.embd_hash);
    assert_eq!(out.head_hash, src.head_hash);
    assert_eq!(out.globals_hash, src.globals_hash);
    assert_eq!(out.id, src.id);
}

#[test]
fn slice_sizes_match_the_research_notes() {
    // llama-slicing.md §3: 22.2 MB for 10 layers, 33.3 MB for 15 layers,
    // 65.1 MB for the last 15, 54.0 MB for the last 10.
    let dir = common::tmp();
    let src = common::model_path();
    let mb = |a: u32, b: u32| {
        let out = write_slice(&src, a, b, &dir.path().join(format!("{a}-{b}.gguf"))).unwrap();
        (out.info.file_bytes as f64 / 1e6 * 10.0).round() / 10.0
    };
    assert_eq!(mb(0, 10), 22.2);
    assert_eq!(mb(0, 15), 33.3);
    assert_eq!(mb(15, 30), 65.1);
    assert_eq!(mb(20, 30), 54.0);
}

#[test]
fn deterministic_output() {
    let src = common::model_path();
    for (start, end) in [(0, 10), (10, 20), (20, 30)] {
        let a_dir = common::tmp();
        let b_dir = common::tmp();
        // Different names and directories: the bytes must still be equal.
        let a = write_slice(&src, start, end, &a_dir.path().join("a.gguf")).unwrap();
        let b = write_slice(&src, start, end, &b_dir.path().join("b.gguf")).unwrap();
        assert!(std::fs::read(&a.path).unwrap() == std::fs::read(&b.path).unwrap());
        assert_eq!(a.info, b.info);
        if let (Some(x), Some(y)) = (&a.embd_sidecar, &b.embd_sidecar) {
            assert!(std::fs::read(x).unwrap() == std::fs::read(y).unwrap());
        }
        // Rewriting over an existing file gives the same bytes too.
        let c = write_slice(&src, start, end, &a.path).unwrap();
        assert_eq!(c.info, a.info);
    }
}

#[test]
fn stale_sidecar_is_removed() {
    let dir = common::tmp();
    let src = common::model_path();
    let out = dir.path().join("s.gguf");
    let first = write_slice(&src, 0, 10, &out).unwrap();
    assert!(first.embd_sidecar.unwrap().exists());
    let second = write_slice(&src, 10, 20, &out).unwrap();
    assert_eq!(second.embd_sidecar, None);
    assert!(!embd_sidecar_path(&out).exists());
}
