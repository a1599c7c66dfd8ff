//! Every failure mode returns the right error with a readable message, and
//! never panics or leaves temporary files behind.

mod common;

use std::path::Path;

use nakshatra_slicer::{
    inspect, write_gguf, write_slice, Gguf, GgufError, MetaValue, NewTensor, SliceError, TensorData,
};

fn slice_err(src: &Path, start: u32, end: u32) -> SliceError {
    let dir = common::tmp();
    let err = write_slice(src, start, end, &dir.path().join("out.gguf")).unwrap_err();
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    err
}

#[test]
fn empty_range() {
    let src = common::model_path();
    let e = slice_err(&src, 5, 5);
    assert!(
        matches!(e, SliceError::EmptyRange { start: 5, end: 5 }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "layer range 5..5 is empty: the first layer must be lower than the end"
    );
    let e = slice_err(&src, 7, 5);
    assert!(
        matches!(e, SliceError::EmptyRange { start: 7, end: 5 }),
        "{e:?}"
    );
}

#[test]
fn range_past_the_last_layer() {
    let src = common::model_path();
    let e = slice_err(&src, 0, 31);
    assert!(
        matches!(
            e,
            SliceError::RangeOutOfBounds {
                start: 0,
                end: 31,
                n_layers: 30
            }
        ),
        "{e:?}"
    );
    let e = slice_err(&src, 25, 40);
    assert_eq!(
        e.to_string(),
        "layers 25..40 are out of range: model has 30 layers (0..30)"
    );
    let e = slice_err(&src, 30, 40);
    assert!(matches!(e, SliceError::RangeOutOfBounds { .. }), "{e:?}");
}

#[test]
fn missing_file() {
    let dir = common::tmp();
    let e = Gguf::open(&dir.path().join("nope.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.gguf"), "{e}");
    let e = slice_err(&dir.path().join("nope.gguf"), 0, 1);
    assert!(matches!(e, SliceError::Gguf(GgufError::Io { .. })), "{e:?}");
    // A directory is not a file.
    let e = Gguf::open(dir.path()).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e:?}");
}

#[test]
fn not_a_gguf_file() {
    let dir = common::tmp();
    let path = dir.path().join("random.bin");
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..100_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(&path, junk).unwrap();
    let e = Gguf::open(&path).unwrap_err();
    assert!(matches!(e, GgufError::NotGguf { .. }), "{e:?}");
    assert!(e.to_string().contains("is not a GGUF model file"), "{e}");
    let e = inspect(&path).unwrap_err();
    assert!(
        matches!(e, SliceError::Gguf(GgufError::NotGguf { .. })),
        "{e:?}"
    );
    let e = slice_err(&path, 0, 1);
    assert!(
        matches!(e, SliceError::Gguf(GgufError::NotGguf { .. })),
        "{e:?}"
    );

    let text = dir.path().join("hello.txt");
    std::fs::write(&text, "hello world\n").unwrap();
    assert!(matches!(Gguf::open(&text), Err(GgufError::NotGguf { .. })));
}

#[test]
fn empty_file() {
    let dir = common::tmp();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    let e = Gguf::open(&path).unwrap_err();
    assert!(matches!(e, GgufError::NotGguf { .. }), "{e:?}");
    let e = slice_err(&path, 0, 1);
    assert!(
        matches!(e, SliceError::Gguf(GgufError::NotGguf { .. })),
        "{e:?}"
    );
}

#[test]
fn truncated_model() {
    let src = common::model_path();
    let full = std::fs::read(&src).unwrap();
    let g = Gguf::open(&src).unwrap();
    let data_offset = g.data_offset() as usize;
    let dir = common::tmp();
    let cuts = [
        ("after the magic", 4),
        ("in the header", 20),
        ("in the first key", 30),
        ("mid-KV (token list)", 1000),
        ("mid-KV (merges)", 1_000_000),
        ("mid-tensor-info", data_offset - 40),
        ("at the start of the data", data_offset),
        ("mid-data", data_offset + 1000),
        ("mid-data, late", full.len() / 2),
        ("last byte missing", full.len() - 1),
    ];
    for (what, cut) in cuts {
        let path = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = Gguf::open(&path).unwrap_err();
        match &e {
            GgufError::Truncated { file_len, .. } => assert_eq!(*file_len, cut as u64, "{what}"),
            other => panic!("{what}: expected Truncated, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("is truncated or corrupt"), "{what}: {msg}");
        let e = inspect(&path).unwrap_err();
        assert!(
            matches!(e, SliceError::Gguf(GgufError::Truncated { .. })),
            "{what}: {e:?}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

/// Writes a tiny synthetic model with `arch` and 2 layers.
fn tiny_model(path: &Path, arch: &str) {
    let meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String(arch.into()),
        ),
        (format!("{arch}.block_count"), MetaValue::U32(2)),
        (format!("{arch}.embedding_length"), MetaValue::U32(4)),
    ];
    let t = |name: &str, dims: Vec<u64>| NewTensor {
        name: name.into(),
        ggml_type: 0,
        dims,
        data: TensorData::Zeros,
    };
    let tensors = [
        t("token_embd.weight", vec![4, 8]),
        t("blk.0.attn_norm.weight", vec![4]),
        t("blk.1.attn_norm.weight", vec![4]),
        t("output_norm.weight", vec![4]),
    ];
    let mut f = std::fs::File::create(path).unwrap();
    write_gguf(&mut f, &meta, &tensors).unwrap();
}

#[test]
fn unsupported_arch() {
    let dir = common::tmp();
    for arch in ["gpt2", "mamba"] {
        let path = dir.path().join(format!("{arch}.gguf"));
        tiny_model(&path, arch);
        // It is a valid model that can be inspected...
        let info = inspect(&path).unwrap();
        assert_eq!(info.arch, arch);
        assert_eq!(info.n_layers, 2);
        assert_eq!(info.n_vocab, 8);
        // ...but not sliced.
        let e = slice_err(&path, 0, 1);
        assert!(
            matches!(&e, SliceError::UnsupportedArch { arch: a } if a == arch),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "model architecture '{arch}' is not supported for slicing (supported: {})",
                nakshatra_slicer::FAMILIES
                    .iter()
                    .map(|f| f.arch)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        );
    }
}

#[test]
fn missing_keys_and_tensors() {
    let dir = common::tmp();
    let path = dir.path().join("x.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    write_gguf(&mut f, &[], &[]).unwrap();
    let e = inspect(&path).unwrap_err();
    assert!(
        matches!(&e, SliceError::MissingKey(k) if k == "general.architecture"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "model metadata has no 'general.architecture' key"
    );

    let meta = [(
        "general.architecture".to_string(),
        MetaValue::String("llama".into()),
    )];
    let mut f = std::fs::File::create(&path).unwrap();
    write_gguf(&mut f, &meta, &[]).unwrap();
    let e = slice_err(&path, 0, 1);
    assert!(
        matches!(&e, SliceError::MissingKey(k) if k == "llama.block_count"),
        "{e:?}"
    );

    // block_count larger than the tensors could hold: refused before
    // allocating anything per layer.
    let meta = [
        (
            "general.architecture".to_string(),
            MetaValue::String("llama".into()),
        ),
        ("llama.block_count".to_string(), MetaValue::U32(u32::MAX)),
        ("llama.embedding_length".to_string(), MetaValue::U32(4)),
    ];
    let mut f = std::fs::File::create(&path).unwrap();
    write_gguf(&mut f, &meta, &[]).unwrap();
    let e = inspect(&path).unwrap_err();
    assert!(matches!(&e, SliceError::BadKey { .. }), "{e:?}");
}

#[test]
fn already_sliced_input() {
    let src = common::model_path();
    let dir = common::tmp();
    let first = write_slice(&src, 0, 10, &dir.path().join("first.gguf")).unwrap();
    let source_id = inspect(&src).unwrap().id;
    let e = slice_err(&first.path, 0, 5);
    match &e {
        SliceError::AlreadySliced { source_id: id, .. } => assert_eq!(id, &source_id),
        other => panic!("expected AlreadySliced, got {other:?}"),
    }
    assert!(
        e.to_string().contains("is already a nakshatra slice"),
        "{e}"
    );
    // The embedding sidecar is refused too.
    let sidecar = first.embd_sidecar.unwrap();
    let e = slice_err(&sidecar, 0, 1);
    assert!(matches!(e, SliceError::AlreadySliced { .. }), "{e:?}");
}

#[test]
fn output_errors_leave_nothing_behind() {
    let src = common::model_path();
    let dir = common::tmp();
    // Output directory does not exist.
    let out = dir.path().join("no/such/dir/out.gguf");
    let e = write_slice(&src, 0, 10, &out).unwrap_err();
    assert!(matches!(e, SliceError::Io { .. }), "{e:?}");
    assert!(e.to_string().starts_with("cannot write "), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // Output is the input.
    let copy = dir.path().join("model.gguf");
    std::fs::copy(&src, &copy).unwrap();
    let e = write_slice(&copy, 0, 10, &copy).unwrap_err();
    assert!(matches!(e, SliceError::OutputIsInput { .. }), "{e:?}");
    assert_eq!(
        std::fs::metadata(&copy).unwrap().len(),
        std::fs::metadata(&src).unwrap().len()
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model.gguf"]);
}
