//! Split models (llama.cpp's `gguf-split`: `NAME-00001-of-00003.gguf`, ...):
//! opened from the first shard they read, hash, slice and serve pieces
//! exactly like the merged file; a broken set is a clear error.

mod common;

use std::path::{Path, PathBuf};

use nakshatra_slicer::{
    embd_sidecar_path, inspect, manifest_and_vocab, model_layers, piece_segments, pieces_held,
    write_gguf, write_slice, Gguf, GgufError, MetaValue, NewTensor, SliceError, TensorData,
};

/// Changes the metadata of shard `no` (from 0) before it is written.
type Edit = dyn Fn(usize, &mut Vec<(String, MetaValue)>);

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

/// The path of shard `no` (from 0) of `count` named `stem`, as gguf-split
/// names it.
fn shard_path(dir: &Path, stem: &str, no: usize, count: usize) -> PathBuf {
    dir.join(format!("{stem}-{:05}-of-{count:05}.gguf", no + 1))
}

/// Contiguous runs of `g`'s tensor indices, one per shard, as gguf-split
/// cuts them (the last shard gets the rest).
fn contiguous(g: &Gguf, count: usize) -> Vec<Vec<usize>> {
    let n = g.tensors().len();
    let per = n / count;
    (0..count)
        .map(|i| {
            let end = if i + 1 == count { n } else { (i + 1) * per };
            (i * per..end).collect()
        })
        .collect()
}

/// Writes `g` as the shards `plan` lists (tensor indices of `g`, per shard)
/// into `dir`, as gguf-split does: the `split.*` keys first, all of `g`'s
/// metadata in the first shard only. `edit(no, metadata)` may change a
/// shard's metadata before it is written. Returns the shard paths.
fn write_shards(
    g: &Gguf,
    dir: &Path,
    stem: &str,
    plan: &[Vec<usize>],
    edit: &Edit,
) -> Vec<PathBuf> {
    let count = plan.len();
    let n_tensors: usize = plan.iter().map(Vec::len).sum();
    plan.iter()
        .enumerate()
        .map(|(no, idx)| {
            let mut meta = vec![
                kv("split.no", MetaValue::U16(no as u16)),
                kv("split.count", MetaValue::U16(count as u16)),
                kv("split.tensors.count", MetaValue::I32(n_tensors as i32)),
            ];
            if no == 0 {
                meta.extend_from_slice(g.metadata());
            }
            edit(no, &mut meta);
            let tensors: Vec<NewTensor<'_>> = idx
                .iter()
                .map(|&i| {
                    let t = &g.tensors()[i];
                    NewTensor {
                        name: t.name.clone(),
                        ggml_type: t.ggml_type,
                        dims: t.dims.clone(),
                        data: TensorData::Bytes(g.tensor_data(t)),
                    }
                })
                .collect();
            let path = shard_path(dir, stem, no, count);
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            write_gguf(&mut f, &meta, &tensors).unwrap();
            std::io::Write::flush(&mut f).unwrap();
            path
        })
        .collect()
}

/// The test model split into 3 contiguous shards in `dir`.
fn smol_shards(dir: &Path) -> (Gguf, Vec<PathBuf>) {
    let g = Gguf::open(&common::model_path()).unwrap();
    let plan = contiguous(&g, 3);
    let paths = write_shards(&g, dir, "smol", &plan, &|_, _| {});
    (g, paths)
}

#[test]
fn first_shard_reads_as_the_merged_model() {
    let dir = common::tmp();
    let (merged, paths) = smol_shards(dir.path());
    let g = Gguf::open(&paths[0]).unwrap();

    assert_eq!(g.path(), paths[0]);
    assert_eq!(g.shard_paths().collect::<Vec<_>>(), paths);
    // The split.* keys are not shown: the metadata is the merged file's.
    assert_eq!(g.metadata(), merged.metadata());
    assert!(g.get("split.count").is_none());
    assert_eq!(g.tensors().len(), merged.tensors().len());
    let plan = contiguous(&merged, 3);
    for (no, idx) in plan.iter().enumerate() {
        for &i in idx {
            let (a, b) = (&g.tensors()[i], &merged.tensors()[i]);
            assert_eq!(
                (&a.name, a.ggml_type, &a.dims),
                (&b.name, b.ggml_type, &b.dims)
            );
            assert_eq!(a.shard as usize, no, "{}", a.name);
            assert_eq!(g.tensor_data(a), merged.tensor_data(b), "{}", a.name);
            assert_eq!(g.tensor(&a.name), Some(a));
        }
    }
    let shard_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(g.file_len(), shard_bytes);

    let (a, b) = (inspect(&paths[0]).unwrap(), inspect(merged.path()).unwrap());
    assert_eq!(a.id, b.id);
    assert_eq!(a.n_layers, 30);
    assert_eq!(
        (
            a.n_layers,
            a.n_embd,
            a.n_vocab,
            &a.block_hashes,
            &a.embd_hash
        ),
        (
            b.n_layers,
            b.n_embd,
            b.n_vocab,
            &b.block_hashes,
            &b.embd_hash
        )
    );
    assert_eq!(
        (&a.head_hash, &a.globals_hash),
        (&b.head_hash, &b.globals_hash)
    );
    assert_eq!(
        model_layers(&paths[0]).unwrap(),
        model_layers(merged.path()).unwrap()
    );
}

#[test]
fn model_id_does_not_depend_on_the_shard_layout() {
    let dir = common::tmp();
    let merged = Gguf::open(&common::model_path()).unwrap();
    // Round robin over 4 shards: every shard holds parts of many blocks,
    // and the tensor order differs from the merged file's.
    let n = merged.tensors().len();
    let plan: Vec<Vec<usize>> = (0..4).map(|s| (s..n).step_by(4).collect()).collect();
    let paths = write_shards(&merged, dir.path(), "rr", &plan, &|_, _| {});
    let a = inspect(&paths[0]).unwrap();
    let b = inspect(merged.path()).unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(a.block_hashes, b.block_hashes);
}

#[test]
fn slices_from_shards_are_byte_identical() {
    let dir = common::tmp();
    let (merged, paths) = smol_shards(dir.path());
    for (start, end) in [(0, 10), (10, 20), (20, 30)] {
        let a = dir.path().join(format!("sharded-{start}.gguf"));
        let b = dir.path().join(format!("merged-{start}.gguf"));
        let wa = write_slice(&paths[0], start, end, &a).unwrap();
        let wb = write_slice(merged.path(), start, end, &b).unwrap();
        assert_eq!(wa.info.id, wb.info.id, "{start}..{end}");
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "slice {start}..{end} differs"
        );
        assert_eq!(wa.embd_sidecar.is_some(), start == 0);
        if start == 0 {
            assert!(
                std::fs::read(embd_sidecar_path(&a)).unwrap()
                    == std::fs::read(embd_sidecar_path(&b)).unwrap(),
                "sidecar differs"
            );
        }
        // A slice is one file: nothing of the split is left in it.
        let s = Gguf::open(&a).unwrap();
        assert_eq!(s.shard_paths().len(), 1);
    }
}

#[test]
fn pieces_from_shards_match_the_merged_model() {
    let dir = common::tmp();
    let (merged, paths) = smol_shards(dir.path());
    let (ma, va) = manifest_and_vocab(&paths[0]).unwrap();
    let (mb, vb) = manifest_and_vocab(merged.path()).unwrap();
    assert_eq!(ma, mb);
    assert!(va == vb, "vocabulary files differ");

    let g = Gguf::open(&paths[0]).unwrap();
    let held = pieces_held(&g, &ma);
    assert_eq!(held.len(), ma.pieces.len());
    assert_eq!(held, pieces_held(&merged, &mb));
    let mut shards_used = std::collections::BTreeSet::new();
    for p in &ma.pieces {
        let a = piece_segments(&g, p).unwrap().concat();
        let b = piece_segments(&merged, p).unwrap().concat();
        assert!(a == b, "piece {} differs", p.id);
        assert_eq!(a.len() as u64, p.n_bytes);
        for t in &p.tensors {
            shards_used.insert(g.tensors()[t.index as usize].shard);
        }
    }
    assert_eq!(shards_used.len(), 3, "pieces come from every shard");
}

/// The synthetic qwen2 model (11 tensors) split into 3 shards by `edit`.
fn qwen2_shards(dir: &Path, edit: &Edit) -> (Gguf, Vec<PathBuf>) {
    let src = dir.join("qwen2.gguf");
    common::qwen2::write_model(&src);
    let g = Gguf::open(&src).unwrap();
    let plan = contiguous(&g, 3);
    let paths = write_shards(&g, dir, "q", &plan, edit);
    (g, paths)
}

fn set(meta: &mut [(String, MetaValue)], key: &str, v: MetaValue) {
    let e = meta.iter_mut().find(|(k, _)| k == key).unwrap();
    e.1 = v;
}

fn open_err(path: &Path) -> GgufError {
    let e = Gguf::open(path).unwrap_err();
    // Every refusal reaches the commands the same way.
    let s = inspect(path).unwrap_err();
    assert!(matches!(s, SliceError::Gguf(_)), "{s:?}");
    assert_eq!(s.to_string(), e.to_string());
    e
}

#[test]
fn small_split_model_reads_as_merged() {
    let dir = common::tmp();
    let (merged, paths) = qwen2_shards(dir.path(), &|_, _| {});
    let a = inspect(&paths[0]).unwrap();
    let b = inspect(merged.path()).unwrap();
    assert_eq!(a.id, b.id);
    let (ma, va) = manifest_and_vocab(&paths[0]).unwrap();
    let (mb, vb) = manifest_and_vocab(merged.path()).unwrap();
    assert_eq!((ma, va), (mb, vb));
    // A one-shard "split" (split.count = 1) is an ordinary file, and so
    // is a merged file (gguf-split --merge keeps split.count = 0): the keys
    // are not shown and not hashed.
    for count in [0u16, 1] {
        let one = dir.path().join(format!("one-{count}.gguf"));
        let mut meta = vec![
            kv("split.no", MetaValue::U16(0)),
            kv("split.count", MetaValue::U16(count)),
            kv(
                "split.tensors.count",
                MetaValue::I32(merged.tensors().len() as i32),
            ),
        ];
        meta.extend_from_slice(merged.metadata());
        let tensors: Vec<NewTensor<'_>> = merged
            .tensors()
            .iter()
            .map(|t| NewTensor {
                name: t.name.clone(),
                ggml_type: t.ggml_type,
                dims: t.dims.clone(),
                data: TensorData::Bytes(merged.tensor_data(t)),
            })
            .collect();
        write_gguf(&mut std::fs::File::create(&one).unwrap(), &meta, &tensors).unwrap();
        let g = Gguf::open(&one).unwrap();
        assert_eq!(g.metadata(), merged.metadata());
        assert_eq!(inspect(&one).unwrap().id, b.id);
    }
}

#[test]
fn missing_shard_is_named() {
    let dir = common::tmp();
    let (_, paths) = qwen2_shards(dir.path(), &|_, _| {});
    std::fs::remove_file(&paths[1]).unwrap();
    let e = open_err(&paths[0]);
    assert!(
        matches!(&e, GgufError::MissingShard { path, count: 3, .. } if *path == paths[1]),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("q-00002-of-00003.gguf is missing"), "{msg}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn other_shard_given_names_the_first() {
    let dir = common::tmp();
    let (_, paths) = qwen2_shards(dir.path(), &|_, _| {});
    for p in &paths[1..] {
        let e = open_err(p);
        assert!(
            matches!(&e, GgufError::NotFirstShard { count: 3, .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("give the first shard: {}", paths[0].display())),
            "{msg}"
        );
    }
    // Renamed away from the pattern: still refused, with the name to look
    // for.
    let odd = dir.path().join("renamed.gguf");
    std::fs::copy(&paths[2], &odd).unwrap();
    let msg = open_err(&odd).to_string();
    assert!(
        msg.contains("give the first shard: the file whose name ends in -00001-of-00003.gguf"),
        "{msg}"
    );
}

#[test]
fn first_shard_must_keep_its_name() {
    let dir = common::tmp();
    let (_, paths) = qwen2_shards(dir.path(), &|_, _| {});
    let odd = dir.path().join("model.gguf");
    std::fs::copy(&paths[0], &odd).unwrap();
    let e = open_err(&odd);
    assert!(matches!(&e, GgufError::BadSplit { .. }), "{e:?}");
    assert!(e.to_string().contains("-00001-of-00003.gguf"), "{e}");
}

/// Opening the first shard of a set written with `edit` fails with a
/// `BadSplit` or `BadTensor` error about `culprit` (a shard number from 0)
/// whose message contains `needle`.
fn bad_set(edit: &Edit, culprit: usize, needle: &str) {
    let dir = common::tmp();
    let (_, paths) = qwen2_shards(dir.path(), edit);
    let e = open_err(&paths[0]);
    let path = match &e {
        GgufError::BadSplit { path, .. } | GgufError::BadTensor { path, .. } => path,
        _ => panic!("{e:?}"),
    };
    assert_eq!(*path, paths[culprit], "{e}");
    assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
}

#[test]
fn wrong_split_no_is_refused() {
    bad_set(
        &|no, m| {
            if no == 1 {
                set(m, "split.no", MetaValue::U16(2));
            }
        },
        1,
        "it says it is shard 3 of 3, but as named next to",
    );
}

#[test]
fn wrong_split_count_is_refused() {
    bad_set(
        &|no, m| {
            if no == 2 {
                set(m, "split.count", MetaValue::U16(4));
            }
        },
        2,
        "it says it is shard 3 of 4",
    );
    // A shard without split keys is not part of the set.
    bad_set(
        &|no, m| {
            if no == 2 {
                m.retain(|(k, _)| !k.starts_with("split."));
            }
        },
        2,
        "it has no split.count over 1",
    );
}

#[test]
fn tensor_count_mismatch_is_refused() {
    bad_set(
        &|no, m| {
            if no == 0 {
                set(m, "split.tensors.count", MetaValue::I32(10));
            }
        },
        0,
        "split.tensors.count is 10, but its 3 shards hold 11 tensors",
    );
    bad_set(
        &|no, m| {
            if no == 0 {
                m.retain(|(k, _)| k != "split.tensors.count");
            }
        },
        0,
        "the first shard has no split.tensors.count",
    );
}

#[test]
fn bad_split_keys_are_refused() {
    // Types llama.cpp insists on.
    bad_set(
        &|no, m| {
            if no == 0 {
                set(m, "split.count", MetaValue::U32(3));
            }
        },
        0,
        "split.count must be a u16",
    );
    bad_set(
        &|no, m| {
            if no == 0 {
                set(m, "split.count", MetaValue::U16(2000));
            }
        },
        0,
        "split.count is 2000, more than the 1024 shards",
    );
    bad_set(
        &|no, m| {
            if no == 0 {
                set(m, "split.no", MetaValue::I32(0));
            }
        },
        0,
        "split.no must be a u16",
    );
}

#[test]
fn duplicate_tensor_across_shards_is_refused() {
    let dir = common::tmp();
    let src = dir.path().join("qwen2.gguf");
    common::qwen2::write_model(&src);
    let g = Gguf::open(&src).unwrap();
    let mut plan = contiguous(&g, 3);
    // Shard 3 also holds the first tensor of shard 2.
    let dup = plan[1][0];
    plan[2].push(dup);
    let paths = write_shards(&g, dir.path(), "q", &plan, &|_, _| {});
    let e = open_err(&paths[0]);
    assert!(
        matches!(&e, GgufError::BadTensor { path, name, .. }
            if *path == paths[2] && *name == g.tensors()[dup].name),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains(&format!("it is also in the shard {}", paths[1].display())),
        "{e}"
    );
}

#[test]
fn shard_from_memory_is_refused() {
    let dir = common::tmp();
    let (_, paths) = qwen2_shards(dir.path(), &|_, _| {});
    let e = Gguf::from_bytes(std::fs::read(&paths[0]).unwrap(), "peer data").unwrap_err();
    assert!(matches!(&e, GgufError::BadSplit { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot be read from memory"), "{e}");
}
