//! Pieces: the manifest, serving pieces from models, slices and sidecars,
//! verifying streams with `PieceHasher`, and writing slices from pieces
//! byte-identical to `write_slice`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use nakshatra_slicer::{
    embd_sidecar_path, inspect, manifest, manifest_and_vocab, piece_segments, pieces_held,
    vocab_gguf, write_gguf, write_slice, write_slice_from_pieces, Gguf, Manifest, MetaValue,
    ModelHashes, ModelInfo, Piece, PieceHasher, PieceId, SliceError, MAX_PIECES_ALIGNMENT,
};

/// SmolLM2's info, manifest and vocabulary, computed once.
fn smol() -> &'static (ModelInfo, Manifest, Vec<u8>) {
    static CELL: OnceLock<(ModelInfo, Manifest, Vec<u8>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let src = common::model_path();
        let info = inspect(&src).unwrap();
        let (m, vocab) = manifest_and_vocab(&src).unwrap();
        (info, m, vocab)
    })
}

/// The synthetic qwen2 model (untied head, `output.bias`, alignment 64)
/// written into `dir`, with its info, manifest and vocabulary.
fn qwen2(dir: &Path) -> (PathBuf, ModelInfo, Manifest, Vec<u8>) {
    let src = dir.join("qwen2.gguf");
    common::qwen2::write_model(&src);
    let info = inspect(&src).unwrap();
    let (m, vocab) = manifest_and_vocab(&src).unwrap();
    (src, info, m, vocab)
}

/// The stream of `piece` read from `g`.
fn stream(g: &Gguf, piece: &Piece) -> Vec<u8> {
    piece_segments(g, piece).unwrap().concat()
}

/// Hashes `bytes` with a `PieceHasher` fed `chunk` bytes at a time.
fn hash_chunked(piece: &Piece, bytes: &[u8], chunk: usize) -> Result<(), SliceError> {
    let mut h = PieceHasher::new(piece);
    for c in bytes.chunks(chunk.max(1)) {
        h.update(c);
    }
    assert_eq!(h.bytes_received(), bytes.len() as u64);
    h.finalize()
}

fn piece_path(dir: &Path, id: &PieceId) -> PathBuf {
    dir.join(format!("{id}.piece"))
}

/// Writes every piece of `m` that `g` holds into `dir`, each verified with
/// a `PieceHasher` first (as a fetching node would).
fn write_pieces(g: &Gguf, m: &Manifest, dir: &Path) {
    for id in pieces_held(g, m) {
        let p = m.piece(&id).unwrap();
        let mut h = PieceHasher::new(p);
        let segs = piece_segments(g, p).unwrap();
        for s in &segs {
            h.update(s);
        }
        h.finalize().unwrap();
        std::fs::write(piece_path(dir, &id), segs.concat()).unwrap();
    }
}

fn assert_mismatch(r: Result<(), SliceError>, what: &str) {
    match r {
        Err(SliceError::PieceMismatch { .. }) => {}
        other => panic!("{what}: expected PieceMismatch, got {other:?}"),
    }
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn manifest_matches_inspect() {
    let (info, m, vocab) = smol();
    let src = common::model_path();
    assert_eq!(m.model_id, info.id);
    assert_eq!(
        (m.arch.as_str(), m.n_layers, m.n_embd, m.n_vocab),
        ("llama", 30, 576, 49152)
    );
    assert!(m.tied_embeddings);
    // Embd, 30 blocks, Globals; tied, so no Head.
    assert_eq!(m.pieces.len(), 32);
    let ids: Vec<PieceId> = m.pieces.iter().map(|p| p.id).collect();
    let mut want = vec![PieceId::Embd];
    want.extend((0..30).map(PieceId::Block));
    want.push(PieceId::Globals);
    assert_eq!(ids, want);
    for i in 0..30u32 {
        let p = m.piece(&PieceId::Block(i)).unwrap();
        assert_eq!(p.hash, info.block_hashes[i as usize]);
        assert_eq!(p.n_bytes, info.block_bytes[i as usize]);
        assert_eq!(p.tensors.len(), 9);
        assert!(p.tensors.iter().all(|t| t.name.starts_with("blk.N.")));
    }
    let embd = m.piece(&PieceId::Embd).unwrap();
    assert_eq!(embd.hash, info.embd_hash);
    assert_eq!(embd.tensors[0].name, "token_embd.weight");
    assert_eq!(embd.tensors[0].dims, [576, 49152]);
    let globals = m.piece(&PieceId::Globals).unwrap();
    assert_eq!(globals.hash, info.globals_hash);
    let names: Vec<&str> = globals.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["output_norm.weight"]);
    assert!(m.piece(&PieceId::Head).is_none());
    assert_eq!(m.hashes(), ModelHashes::from(info));

    // The pieces cover every tensor byte of the file exactly once.
    let g = Gguf::open(&src).unwrap();
    let total: u64 = m.pieces.iter().map(|p| p.n_bytes).sum();
    assert_eq!(total, g.tensors().iter().map(|t| t.n_bytes).sum::<u64>());
    assert!(total < g.file_len() && total > g.file_len() - 16 * 1024 * 1024);
    assert_eq!(m.range_bytes(0, 30), total);
    let mut index: Vec<u32> = m
        .pieces
        .iter()
        .flat_map(|p| p.tensors.iter().map(|t| t.index))
        .collect();
    index.sort_unstable();
    assert_eq!(index, (0..g.tensors().len() as u32).collect::<Vec<_>>());
    eprintln!(
        "SmolLM2: {} pieces, {total} bytes; embd {} bytes, blocks {}..{} bytes, globals {} bytes",
        m.pieces.len(),
        embd.n_bytes,
        info.block_bytes.iter().min().unwrap(),
        info.block_bytes.iter().max().unwrap(),
        globals.n_bytes
    );

    // Vocabulary: the bytes of vocab_gguf, hashed into the manifest.
    assert_eq!(*vocab, vocab_gguf(&src).unwrap());
    assert_eq!(m.vocab_bytes, vocab.len() as u64);
    assert_eq!(m.vocab_hash, blake3::hash(vocab).to_hex().to_string());
    assert_eq!(manifest(&src).unwrap(), *m);

    // Serialisable, deterministic.
    let json = serde_json::to_string(m).unwrap();
    let back: Manifest = serde_json::from_str(&json).unwrap();
    assert_eq!(back, *m);
    eprintln!("SmolLM2 manifest: {} bytes of JSON", json.len());
}

#[test]
fn manifest_of_untied_model() {
    let dir = common::tmp();
    let (_, info, m, vocab) = qwen2(dir.path());
    let ids: Vec<PieceId> = m.pieces.iter().map(|p| p.id).collect();
    assert_eq!(
        ids,
        [
            PieceId::Embd,
            PieceId::Block(0),
            PieceId::Block(1),
            PieceId::Block(2),
            PieceId::Globals,
            PieceId::Head
        ]
    );
    assert!(!m.tied_embeddings);
    assert_eq!(
        m.piece(&PieceId::Head).unwrap().hash,
        *info.head_hash.as_ref().unwrap()
    );
    let globals = m.piece(&PieceId::Globals).unwrap();
    let names: Vec<&str> = globals.tensors.iter().map(|t| t.name.as_str()).collect();
    // Sorted by name, output.bias among the globals (as inspect groups it).
    assert_eq!(
        names,
        ["output.bias", "output_norm.weight", "rope_freqs.weight"]
    );
    assert_eq!(globals.hash, info.globals_hash);
    let block: Vec<&str> = m.pieces[1]
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(block, ["blk.N.attn_norm.weight", "blk.N.attn_q.bias"]);
    // Identical layers give identical pieces (but their own indices).
    assert_eq!(m.pieces[1].hash, m.pieces[3].hash);
    assert_eq!(m.hashes(), ModelHashes::from(&info));
    m.verify(&info.id, &vocab).unwrap();
}

#[test]
fn manifest_refuses_nakshatra_files() {
    let dir = common::tmp();
    let src = common::model_path();
    let out = dir.path().join("s.gguf");
    write_slice(&src, 0, 10, &out).unwrap();
    for p in [out.clone(), embd_sidecar_path(&out)] {
        match manifest(&p) {
            Err(SliceError::NotOriginalModel { source_id, .. }) => {
                assert_eq!(source_id, smol().0.id)
            }
            other => panic!("{}: {other:?}", p.display()),
        }
    }
}

#[test]
fn verify_accepts_the_real_manifest() {
    let (info, m, vocab) = smol();
    m.verify(&info.id, vocab).unwrap();
    // Through JSON, as from a peer.
    let back: Manifest = serde_json::from_str(&serde_json::to_string(m).unwrap()).unwrap();
    back.verify(&info.id, vocab).unwrap();
}

/// `m` changed by `f` must fail `verify` with an error `ok` accepts.
fn rejects(f: impl FnOnce(&mut Manifest), ok: impl Fn(&SliceError) -> bool, what: &str) {
    let (info, m, vocab) = smol();
    let mut t = m.clone();
    f(&mut t);
    match t.verify(&info.id, vocab) {
        Err(e) if ok(&e) => eprintln!("{what}: {e}"),
        other => panic!("{what}: unexpected {other:?}"),
    }
}

fn is_bad_manifest(e: &SliceError) -> bool {
    matches!(e, SliceError::BadManifest(_))
}

#[test]
fn verify_rejects_tampered_manifests() {
    let id_mismatch = |e: &SliceError| matches!(e, SliceError::IdMismatch { .. });
    rejects(
        |m| m.pieces[5].hash = "ab".repeat(32),
        id_mismatch,
        "block hash",
    );
    rejects(
        |m| m.pieces[0].hash = "00".repeat(32),
        id_mismatch,
        "embd hash",
    );
    rejects(
        |m| m.pieces[31].hash = "11".repeat(32),
        id_mismatch,
        "globals hash",
    );
    rejects(
        |m| m.pieces[5].hash.make_ascii_uppercase(),
        is_bad_manifest,
        "uppercase hash",
    );
    rejects(|m| m.pieces.swap(3, 4), is_bad_manifest, "pieces swapped");
    rejects(|m| m.n_layers = 29, is_bad_manifest, "n_layers");
    rejects(
        |m| {
            m.n_layers = 29;
            m.pieces.remove(30);
        },
        |e| matches!(e, SliceError::BadHashes(_) | SliceError::BadManifest(_)),
        "n_layers and the last block removed",
    );
    rejects(|m| m.n_embd = 512, is_bad_manifest, "n_embd");
    rejects(|m| m.n_vocab = 49153, is_bad_manifest, "n_vocab");
    rejects(|m| m.arch = "qwen2".into(), is_bad_manifest, "arch");
    rejects(|m| m.tied_embeddings = false, is_bad_manifest, "tied");
    rejects(
        |m| {
            let mut head = m.pieces[0].clone();
            head.id = PieceId::Head;
            head.tensors[0].name = "output.weight".into();
            m.pieces.push(head);
            m.tied_embeddings = false;
        },
        |e| {
            matches!(
                e,
                SliceError::BadManifest(_) | SliceError::IdMismatch { .. }
            )
        },
        "head added",
    );
    rejects(
        |m| m.model_id = "cd".repeat(32),
        is_bad_manifest,
        "model id",
    );
    // A tensor's shape, type, size, name or index changed.
    rejects(
        |m| m.pieces[1].tensors[0].dims[0] += 32,
        is_bad_manifest,
        "dims",
    );
    rejects(
        |m| m.pieces[1].tensors[0].ggml_type = 99,
        is_bad_manifest,
        "type",
    );
    rejects(
        |m| m.pieces[1].tensors[0].n_bytes += 1,
        is_bad_manifest,
        "tensor n_bytes",
    );
    rejects(
        |m| m.pieces[1].n_bytes += 1,
        is_bad_manifest,
        "piece n_bytes",
    );
    rejects(
        |m| m.pieces[1].tensors[0].name = "blk.0.attn_k.weight".into(),
        is_bad_manifest,
        "block tensor name",
    );
    rejects(
        |m| m.pieces[31].tensors[0].name = "token_embd.weight".into(),
        is_bad_manifest,
        "embd in globals",
    );
    rejects(
        |m| m.pieces[1].tensors.swap(0, 1),
        is_bad_manifest,
        "tensor order",
    );
    rejects(
        |m| m.pieces[1].tensors[0].index = m.pieces[1].tensors[1].index,
        is_bad_manifest,
        "duplicate index",
    );
    rejects(
        |m| m.pieces[1].tensors[0].index = 100_000,
        is_bad_manifest,
        "index range",
    );
    rejects(
        |m| m.pieces[1].tensors.clear(),
        is_bad_manifest,
        "empty block",
    );
    // The vocabulary does not match the manifest.
    rejects(
        |m| m.vocab_hash = "ef".repeat(32),
        |e| matches!(e, SliceError::BadVocab(_)),
        "vocab hash",
    );
    rejects(
        |m| m.vocab_bytes += 1,
        |e| matches!(e, SliceError::BadVocab(_)),
        "vocab length",
    );
}

/// Re-encodes the vocabulary file `vocab` with its metadata changed by `f`.
fn retouch(vocab: &[u8], f: impl FnOnce(&mut Vec<(String, MetaValue)>)) -> Vec<u8> {
    let mut meta = Gguf::from_bytes(vocab.to_vec(), "v")
        .unwrap()
        .metadata()
        .to_vec();
    f(&mut meta);
    let mut out = Vec::new();
    write_gguf(&mut out, &meta, &[]).unwrap();
    out
}

#[test]
fn verify_rejects_tampered_vocabularies() {
    let (info, m, vocab) = smol();
    // A flipped byte inside the token list.
    let mut v = vocab.clone();
    let at = v.len() / 2;
    v[at] ^= 0x20;
    match m.verify(&info.id, &v) {
        Err(SliceError::BadVocab(e)) => assert!(e.contains("BLAKE3"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A changed chat template, with the manifest's vocab hash updated to
    // match: the model id still catches it.
    let v = retouch(vocab, |meta| {
        let (_, t) = meta
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.chat_template")
            .unwrap();
        *t = MetaValue::String("{{ evil }}".into());
    });
    let mut t = m.clone();
    t.vocab_hash = blake3::hash(&v).to_hex().to_string();
    t.vocab_bytes = v.len() as u64;
    assert!(matches!(
        t.verify(&info.id, &v),
        Err(SliceError::IdMismatch { .. })
    ));
    // The wrong model id.
    assert!(m.verify(&"0".repeat(64), vocab).is_err());
}

#[test]
fn pieces_for_range_cases() {
    let (_, m, _) = smol();
    let blocks = |r: std::ops::Range<u32>| r.map(PieceId::Block).collect::<Vec<_>>();
    let cat = |a: Vec<PieceId>, b: Vec<PieceId>, c: Vec<PieceId>| [a, b, c].concat();
    use PieceId::{Embd, Globals, Head};
    // Tied: no head; the first slice needs the embedding for its sidecar,
    // the last keeps it in the slice.
    assert_eq!(
        m.pieces_for_range(0, 10).unwrap(),
        cat(vec![Embd], blocks(0..10), vec![Globals])
    );
    assert_eq!(
        m.pieces_for_range(10, 20).unwrap(),
        cat(vec![], blocks(10..20), vec![Globals])
    );
    assert_eq!(
        m.pieces_for_range(20, 30).unwrap(),
        cat(vec![Embd], blocks(20..30), vec![Globals])
    );
    assert_eq!(
        m.pieces_for_range(0, 30).unwrap(),
        cat(vec![Embd], blocks(0..30), vec![Globals])
    );
    assert!(matches!(
        m.pieces_for_range(5, 5),
        Err(SliceError::EmptyRange { start: 5, end: 5 })
    ));
    assert!(matches!(
        m.pieces_for_range(20, 31),
        Err(SliceError::RangeOutOfBounds { n_layers: 30, .. })
    ));
    let size = |ids: &[PieceId]| {
        ids.iter()
            .map(|id| m.piece(id).unwrap().n_bytes)
            .sum::<u64>()
    };
    assert_eq!(
        m.range_bytes(10, 20),
        size(&blocks(10..20)) + size(&[Globals])
    );
    assert_eq!(m.range_bytes(5, 5), 0);
    assert_eq!(m.range_bytes(0, 31), 0);

    // Untied: the last slice also needs the head.
    let dir = common::tmp();
    let (_, _, q, _) = qwen2(dir.path());
    assert_eq!(
        q.pieces_for_range(1, 3).unwrap(),
        cat(vec![Embd], blocks(1..3), vec![Globals, Head])
    );
    assert_eq!(
        q.pieces_for_range(0, 1).unwrap(),
        cat(vec![Embd], blocks(0..1), vec![Globals])
    );
    assert_eq!(
        q.pieces_for_range(1, 2).unwrap(),
        cat(vec![], blocks(1..2), vec![Globals])
    );
    assert_eq!(
        q.pieces_for_range(0, 3).unwrap(),
        cat(vec![Embd], blocks(0..3), vec![Globals, Head])
    );
}

#[test]
fn piece_segments_from_models_slices_and_sidecars() {
    let (_, m, vocab) = smol();
    let src = common::model_path();
    let dir = common::tmp();
    let full = Gguf::open(&src).unwrap();
    assert_eq!(
        pieces_held(&full, m),
        m.pieces.iter().map(|p| p.id).collect::<Vec<_>>()
    );
    let reference: Vec<Vec<u8>> = m.pieces.iter().map(|p| stream(&full, p)).collect();
    for (p, bytes) in m.pieces.iter().zip(&reference) {
        assert_eq!(bytes.len() as u64, p.n_bytes);
    }

    let blocks = |r: std::ops::Range<u32>| r.map(PieceId::Block).collect::<Vec<_>>();
    let mut seen = vec![false; m.pieces.len()];
    for (start, end) in [(0, 10), (10, 20), (20, 30)] {
        let out = dir.path().join(format!("s{start}.gguf"));
        write_slice(&src, start, end, &out).unwrap();
        let g = Gguf::open(&out).unwrap();
        let held = pieces_held(&g, m);
        let mut want = blocks(start..end);
        want.push(PieceId::Globals);
        if end == 30 {
            want.insert(0, PieceId::Embd);
        }
        assert_eq!(held, want, "{start}..{end}");
        for (i, p) in m.pieces.iter().enumerate() {
            if held.contains(&p.id) {
                assert_eq!(stream(&g, p), reference[i], "{} from {start}..{end}", p.id);
                seen[i] = true;
            } else {
                match piece_segments(&g, p) {
                    Err(SliceError::PieceNotHeld { piece, .. }) => assert_eq!(piece, p.id),
                    other => panic!("{} from {start}..{end}: {other:?}", p.id),
                }
            }
        }
        if start == 0 {
            // The placeholder token_embd of a non-last slice is not the
            // embedding; the sidecar holds it.
            let e = piece_segments(&g, m.piece(&PieceId::Embd).unwrap()).unwrap_err();
            assert!(e.to_string().contains("placeholder"), "{e}");
            let side = Gguf::open(&embd_sidecar_path(&out)).unwrap();
            assert_eq!(pieces_held(&side, m), [PieceId::Embd]);
            assert_eq!(stream(&side, &m.pieces[0]), reference[0]);
            let e = piece_segments(&side, m.piece(&PieceId::Block(0)).unwrap()).unwrap_err();
            assert!(matches!(e, SliceError::PieceNotHeld { .. }), "{e}");
        }
    }
    assert!(seen.iter().all(|&s| s), "every piece is held by some slice");

    // A vocabulary file holds nothing.
    let v = Gguf::from_bytes(vocab.clone(), "vocab").unwrap();
    assert!(pieces_held(&v, m).is_empty());
    assert!(matches!(
        piece_segments(&v, &m.pieces[0]),
        Err(SliceError::PieceNotHeld { .. })
    ));
    // A tensor of another shape is refused.
    let mut p = m.pieces[3].clone();
    p.tensors[0].dims.swap(0, 1);
    let e = piece_segments(&full, &p).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
    // A missing tensor is refused.
    let mut p = m.pieces[3].clone();
    p.tensors.pop();
    assert!(piece_segments(&full, &p).is_err());
    // Another model's files hold none of this model's pieces.
    let (qsrc, _, q, _) = qwen2(dir.path());
    assert!(pieces_held(&Gguf::open(&qsrc).unwrap(), m).is_empty());
    let qs = dir.path().join("q.gguf");
    write_slice(&qsrc, 0, 1, &qs).unwrap();
    assert!(pieces_held(&Gguf::open(&qs).unwrap(), m).is_empty());
    assert!(pieces_held(&Gguf::open(&embd_sidecar_path(&qs)).unwrap(), m).is_empty());
    assert_eq!(
        pieces_held(&Gguf::open(&qs).unwrap(), &q),
        [PieceId::Block(0)]
    );
}

#[test]
fn untied_slices_serve_head_and_globals_only_when_last() {
    let dir = common::tmp();
    let (src, _, q, _) = qwen2(dir.path());
    let full = Gguf::open(&src).unwrap();
    let s0 = dir.path().join("s0.gguf");
    write_slice(&src, 0, 1, &s0).unwrap();
    // The non-last slice lacks output.bias, hence the globals piece.
    assert_eq!(
        pieces_held(&Gguf::open(&s0).unwrap(), &q),
        [PieceId::Block(0)]
    );
    let s1 = dir.path().join("s1.gguf");
    write_slice(&src, 1, 3, &s1).unwrap();
    let g = Gguf::open(&s1).unwrap();
    assert_eq!(
        pieces_held(&g, &q),
        [
            PieceId::Embd,
            PieceId::Block(1),
            PieceId::Block(2),
            PieceId::Globals,
            PieceId::Head
        ]
    );
    for id in pieces_held(&g, &q) {
        let p = q.piece(&id).unwrap();
        assert_eq!(stream(&g, p), stream(&full, p), "{id}");
    }
}

#[test]
fn piece_hasher_accepts_every_piece_in_any_chunking() {
    let (_, m, _) = smol();
    let g = Gguf::open(&common::model_path()).unwrap();
    for p in &m.pieces {
        let bytes = stream(&g, p);
        for chunk in [7, 4096, 1 << 20, bytes.len()] {
            hash_chunked(p, &bytes, chunk).unwrap_or_else(|e| panic!("{} / {chunk}: {e}", p.id));
        }
        // Uneven chunks, so boundaries fall everywhere.
        let mut h = PieceHasher::new(p);
        let mut rest = bytes.as_slice();
        let mut k = 1usize;
        while !rest.is_empty() {
            let (a, b) = rest.split_at(k.min(rest.len()));
            h.update(a);
            h.update(&[]);
            rest = b;
            k = k * 7 % 100_003 + 1;
        }
        h.finalize().unwrap();
    }
    // One byte at a time: the globals piece and a whole block.
    for id in [PieceId::Globals, PieceId::Block(7)] {
        let p = m.piece(&id).unwrap();
        hash_chunked(p, &stream(&g, p), 1).unwrap();
    }

    // The synthetic model: several tensors per piece, identical blocks,
    // one byte at a time.
    let dir = common::tmp();
    let (src, _, q, _) = qwen2(dir.path());
    let qg = Gguf::open(&src).unwrap();
    for p in &q.pieces {
        let bytes = stream(&qg, p);
        for chunk in [1, 3, 5, 16, bytes.len()] {
            hash_chunked(p, &bytes, chunk).unwrap_or_else(|e| panic!("{} / {chunk}: {e}", p.id));
        }
    }
}

#[test]
fn piece_hasher_rejects_wrong_streams() {
    let (_, m, _) = smol();
    let g = Gguf::open(&common::model_path()).unwrap();
    for id in [PieceId::Block(3), PieceId::Globals, PieceId::Embd] {
        let p = m.piece(&id).unwrap();
        let bytes = stream(&g, p);
        for at in [
            0,
            (p.tensors[0].n_bytes as usize).min(bytes.len() - 1),
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            assert_mismatch(hash_chunked(p, &b, 4096), &format!("{id} flipped at {at}"));
        }
        assert_mismatch(hash_chunked(p, &bytes[..bytes.len() - 1], 4096), "short");
        let mut long = bytes.clone();
        long.push(0);
        assert_mismatch(hash_chunked(p, &long, 4096), "long");
        assert_mismatch(hash_chunked(p, &[], 4096), "empty");
        match hash_chunked(p, &bytes[1..], 4096) {
            Err(e @ SliceError::PieceMismatch { .. }) => {
                assert!(e.to_string().contains("bytes"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
    // A manifest entry with wrong headers (valid sizes) never verifies:
    // swapped dims, a renamed tensor, or a shifted tensor boundary.
    let p = m.piece(&PieceId::Block(3)).unwrap();
    let bytes = stream(&g, p);
    let mut t = p.clone();
    t.tensors[0].dims.swap(0, 1);
    assert_mismatch(hash_chunked(&t, &bytes, 4096), "dims swapped");
    let mut t = p.clone();
    t.tensors[0].name.push('x');
    assert_mismatch(hash_chunked(&t, &bytes, 4096), "renamed");
    let mut t = p.clone();
    t.tensors[0].n_bytes -= 32;
    t.tensors[1].n_bytes += 32;
    assert_mismatch(hash_chunked(&t, &bytes, 4096), "boundary");
    let mut t = p.clone();
    t.n_bytes += 1;
    let mut long = bytes.clone();
    long.push(0);
    assert_mismatch(
        hash_chunked(&t, &long, 4096),
        "tensors shorter than the piece",
    );

    // Header changes that keep every size pass verify (only the data can
    // tell), but no data matches them: a dims swap, an extra dim of 1.
    let (info, m, vocab) = smol();
    let (i, j) =
        m.pieces
            .iter()
            .enumerate()
            .find_map(|(i, p)| {
                let j = p.tensors.iter().position(|t| {
                    t.dims.len() == 2 && t.dims[0] != t.dims[1] && t.dims[1] % 32 == 0
                })?;
                Some((i, j))
            })
            .unwrap();
    let bytes = stream(&g, &m.pieces[i]);
    for f in [
        (|d: &mut Vec<u64>| d.swap(0, 1)) as fn(&mut Vec<u64>),
        |d: &mut Vec<u64>| d.push(1),
    ] {
        let mut t = m.clone();
        f(&mut t.pieces[i].tensors[j].dims);
        t.verify(&info.id, vocab).unwrap();
        assert_mismatch(hash_chunked(&t.pieces[i], &bytes, 1 << 20), "dims");
    }
}

#[test]
fn piece_hasher_speed() {
    let (_, m, _) = smol();
    let g = Gguf::open(&common::model_path()).unwrap();
    let p = m.pieces.iter().max_by_key(|p| p.n_bytes).unwrap();
    let bytes = stream(&g, p);
    let mb = bytes.len() as f64 / 1e6;
    let best = |f: &dyn Fn()| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let plain = best(&|| {
        std::hint::black_box(blake3::hash(&bytes));
    });
    let mut report = format!(
        "largest piece {} ({mb:.1} MB): blake3 {:.0} MB/s",
        p.id,
        mb / plain
    );
    for chunk in [4096usize, 64 * 1024, 1 << 20] {
        let t = best(&|| hash_chunked(p, &bytes, chunk).unwrap());
        report += &format!(", PieceHasher/{chunk} {:.0} MB/s", mb / t);
        assert!(t < plain * 2.5 + 0.02, "{report}");
    }
    eprintln!("{report}");
}

/// Writes `start..end` with `write_slice` and with `write_slice_from_pieces`
/// (pieces taken from `pieces_dir`) and checks the files are identical.
fn check_identical(
    src: &Path,
    m: &Manifest,
    vocab: &[u8],
    pieces_dir: &Path,
    out_dir: &Path,
    start: u32,
    end: u32,
) {
    let a = out_dir.join(format!("a-{start}-{end}.gguf"));
    let b = out_dir.join(format!("b-{start}-{end}.gguf"));
    let wa = write_slice(src, start, end, &a).unwrap();
    let wb = write_slice_from_pieces(m, vocab, &|id| piece_path(pieces_dir, id), start, end, &b)
        .unwrap();
    assert_eq!(wb.path, b);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "{start}..{end}: slices differ"
    );
    assert_eq!(wa.info, wb.info);
    assert_eq!(wa.bytes, wb.bytes);
    match (&wa.embd_sidecar, &wb.embd_sidecar) {
        (Some(sa), Some(sb)) => {
            assert_eq!(*sb, embd_sidecar_path(&b));
            assert!(
                std::fs::read(sa).unwrap() == std::fs::read(sb).unwrap(),
                "{start}..{end}: sidecars differ"
            );
        }
        (None, None) => assert!(!embd_sidecar_path(&b).exists()),
        other => panic!("{start}..{end}: {other:?}"),
    }
    // No temporary files are left.
    let tmp = std::fs::read_dir(out_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count();
    assert_eq!(tmp, 0);
}

#[test]
fn write_slice_from_pieces_is_byte_identical() {
    let (_, m, vocab) = smol();
    let src = common::model_path();
    let pieces = common::tmp();
    let out = common::tmp();
    write_pieces(&Gguf::open(&src).unwrap(), m, pieces.path());
    for (start, end) in [(0, 10), (10, 20), (20, 30), (0, 15), (15, 30), (0, 30)] {
        check_identical(&src, m, vocab, pieces.path(), out.path(), start, end);
    }
}

#[test]
fn write_slice_from_pieces_is_byte_identical_untied() {
    let dir = common::tmp();
    let (src, _, q, vocab) = qwen2(dir.path());
    let pieces = common::tmp();
    let out = common::tmp();
    write_pieces(&Gguf::open(&src).unwrap(), &q, pieces.path());
    for (start, end) in [(0, 1), (1, 2), (2, 3), (1, 3), (0, 2), (0, 3)] {
        check_identical(&src, &q, &vocab, pieces.path(), out.path(), start, end);
    }
}

#[test]
fn write_slice_from_pieces_needs_only_the_range_pieces() {
    // Pieces fetched from slices (not the full model) suffice for the slice.
    let (_, m, vocab) = smol();
    let src = common::model_path();
    let dir = common::tmp();
    let pieces = common::tmp();
    let s = dir.path().join("s.gguf");
    write_slice(&src, 10, 20, &s).unwrap();
    write_pieces(&Gguf::open(&s).unwrap(), m, pieces.path());
    assert_eq!(
        std::fs::read_dir(pieces.path()).unwrap().count(),
        m.pieces_for_range(12, 18).unwrap().len() + 4
    );
    check_identical(&src, m, vocab, pieces.path(), dir.path(), 12, 18);
    // Stale sidecar removal works as for write_slice.
    let out = dir.path().join("o.gguf");
    let full = common::tmp();
    write_pieces(&Gguf::open(&src).unwrap(), m, full.path());
    let w =
        write_slice_from_pieces(m, vocab, &|id| piece_path(full.path(), id), 0, 5, &out).unwrap();
    assert!(w.embd_sidecar.is_some());
    write_slice_from_pieces(m, vocab, &|id| piece_path(full.path(), id), 5, 30, &out).unwrap();
    assert!(!embd_sidecar_path(&out).exists());
}

#[test]
fn write_slice_from_pieces_errors_leave_nothing() {
    let (info, m, vocab) = smol();
    let src = common::model_path();
    let pieces = common::tmp();
    write_pieces(&Gguf::open(&src).unwrap(), m, pieces.path());
    let out_dir = common::tmp();
    let out = out_dir.path().join("s.gguf");
    let at = |dir: PathBuf| move |id: &PieceId| piece_path(&dir, id);

    // A missing piece file.
    let missing = common::tmp();
    for id in m.pieces_for_range(0, 10).unwrap() {
        if id != PieceId::Block(4) {
            std::fs::copy(
                piece_path(pieces.path(), &id),
                piece_path(missing.path(), &id),
            )
            .unwrap();
        }
    }
    let e = write_slice_from_pieces(m, vocab, &at(missing.path().into()), 0, 10, &out).unwrap_err();
    match &e {
        SliceError::PieceFile { piece, reason, .. } => {
            assert_eq!(*piece, PieceId::Block(4));
            assert!(reason.contains("cannot open"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    eprintln!("{e}");
    assert!(dir_is_empty(out_dir.path()));

    // A short piece file, and a long one.
    for delta in [-1i64, 1] {
        let p = piece_path(missing.path(), &PieceId::Block(4));
        let mut bytes = std::fs::read(piece_path(pieces.path(), &PieceId::Block(4))).unwrap();
        if delta < 0 {
            bytes.pop();
        } else {
            bytes.push(0);
        }
        std::fs::write(&p, &bytes).unwrap();
        let e =
            write_slice_from_pieces(m, vocab, &at(missing.path().into()), 0, 10, &out).unwrap_err();
        match &e {
            SliceError::PieceFile { piece, reason, .. } => {
                assert_eq!(*piece, PieceId::Block(4));
                assert!(reason.contains("bytes"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        eprintln!("{e}");
        assert!(dir_is_empty(out_dir.path()));
    }

    // The same range errors as write_slice.
    let full = at(pieces.path().into());
    assert!(matches!(
        write_slice_from_pieces(m, vocab, &full, 3, 3, &out),
        Err(SliceError::EmptyRange { .. })
    ));
    assert!(matches!(
        write_slice_from_pieces(m, vocab, &full, 0, 31, &out),
        Err(SliceError::RangeOutOfBounds { .. })
    ));
    // The output is one of the piece files.
    let target = piece_path(pieces.path(), &PieceId::Block(2));
    assert!(matches!(
        write_slice_from_pieces(m, vocab, &full, 0, 10, &target),
        Err(SliceError::OutputIsInput { .. })
    ));
    // A tampered manifest or a vocabulary of another model.
    let mut t = m.clone();
    t.n_embd += 1;
    assert!(write_slice_from_pieces(&t, vocab, &full, 0, 10, &out).is_err());
    let other = common::tmp();
    let (_, _, _, qvocab) = qwen2(other.path());
    assert!(write_slice_from_pieces(m, &qvocab, &full, 0, 10, &out).is_err());
    // A vocabulary whose (unauthenticated) general.alignment is huge: it
    // still verifies against the id, but is refused.
    let v = retouch(vocab, |meta| {
        meta.retain(|(k, _)| k != "general.alignment");
        meta.insert(1, ("general.alignment".into(), MetaValue::U32(1 << 30)));
    });
    let mut t = m.clone();
    t.vocab_hash = blake3::hash(&v).to_hex().to_string();
    t.vocab_bytes = v.len() as u64;
    t.verify(&info.id, &v).unwrap();
    match write_slice_from_pieces(&t, &v, &full, 0, 10, &out) {
        Err(SliceError::BadVocab(e)) => {
            assert!(e.contains(&MAX_PIECES_ALIGNMENT.to_string()), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(dir_is_empty(out_dir.path()));
}
