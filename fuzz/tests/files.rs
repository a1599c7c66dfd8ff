//! Fuzz targets: the files a node takes from peers. The GGUF parser
//! (`Gguf::from_bytes`), the vocabulary check (`vocab::verify`, as the
//! node runs it on every vocabulary from a peer or its cache), the
//! manifest chain (`SignedBlob::verify`, `decode::<Manifest>`,
//! `Manifest::verify`, as `fetch::manifest` runs it) and the piece
//! hasher (`PieceHasher`, fed a piece's stream in any chunking). See the
//! crate doc.

use arbitrary::{Result, Unstructured};
use nakshatra_fuzz::harness::DECODE_CAP;
use nakshatra_fuzz::model::{fixtures, Fixture};
use nakshatra_fuzz::{check, fuzz, gen, mutate, Cap};
use nakshatra_slicer::{header_layers, piece_segments, Gguf, Manifest, PieceHasher};
use nakshatra_swarm::protocol::fetch::{SignedBlob, MANIFEST_DOMAIN, MAX_MANIFEST_BYTES};
use nakshatra_swarm::protocol::{decode, PeerId};

#[global_allocator]
static ALLOC: nakshatra_fuzz::CountingAlloc = nakshatra_fuzz::CountingAlloc;

/// What parsing a GGUF of `len` bytes may allocate: the parser reserves
/// nothing a count in the file claims beyond what the rest of the file
/// could hold, so memory is proportional to the file. The worst cases
/// (`gguf_worst_cases`: many tiny metadata entries, arrays of empty
/// strings, many tiny tensors) reach a largest allocation of 3.3× the
/// file (a list of 56-byte entries, 14 file bytes each, or its key map)
/// and a peak of 8× (the entries, their key maps and keys); the caps
/// leave room for a map's power-of-two rounding.
fn gguf_cap(len: usize) -> Cap {
    Cap {
        largest: 6 * len,
        peak: 16 * len,
    }
}

/// One of the fixtures.
fn fixture(u: &mut Unstructured<'_>) -> Result<&'static Fixture> {
    u.choose(fixtures())
}

/// The GGUF parser on mutated models and vocabularies; whatever parses
/// can be walked (every tensor's data, the header's layer count) without
/// a panic.
#[test]
fn gguf_parser() {
    let seeds: Vec<Vec<u8>> = fixtures()
        .iter()
        .flat_map(|f| [f.model_gguf.clone(), f.vocab.clone()])
        .collect();
    fuzz("gguf_parser", 65_536, |u, stats| {
        let input = mutate::input(u, &seeds, 1 << 20)?;
        let (ok, usage) = check(
            "gguf_parser",
            &input,
            // The copy `from_bytes` takes, then the parse.
            gguf_cap(input.len()).plus(input.len()),
            String::new,
            || match Gguf::from_bytes(input.clone(), "fuzz") {
                Ok(g) => {
                    let mut sum = 0usize;
                    for t in g.tensors() {
                        sum = sum.wrapping_add(g.tensor_data(t).len());
                        let _ = (t.type_info(), t.n_elements());
                    }
                    for (_, v) in g.metadata() {
                        let _ = (v.brief(), v.as_u64(), v.as_str().map(str::len));
                    }
                    let _ = header_layers(&g);
                    std::hint::black_box(sum);
                    true
                }
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
            },
        );
        stats.record(ok, usage);
        Ok(())
    });
}

/// The node's vocabulary check (`nakshatra_node::vocab::verify`): the
/// encoded hashes and the vocabulary GGUF from a peer, against the model
/// id the asker trusts. Only the fixture's own pair passes.
#[test]
fn vocabularies() {
    fuzz("vocabularies", 65_536, |u, stats| {
        let f = fixture(u)?;
        let hashes_seed = gen::bytes(&f.hashes);
        let (gguf, hashes) = match u.int_in_range(0..=3u8)? {
            0 => (f.vocab.clone(), mutate::input(u, &[hashes_seed], 1 << 16)?),
            1 => (
                mutate::input(u, std::slice::from_ref(&f.vocab), 1 << 20)?,
                mutate::input(u, &[hashes_seed], 1 << 16)?,
            ),
            _ => (
                mutate::input(u, std::slice::from_ref(&f.vocab), 1 << 20)?,
                hashes_seed,
            ),
        };
        let both = [&gguf[..], &hashes[..]].concat();
        let (ok, usage) = check(
            "vocabularies",
            &both,
            // The hashes' decode, then the copy of the GGUF and its parse.
            Cap {
                largest: DECODE_CAP.largest.max(gguf_cap(gguf.len()).largest),
                peak: DECODE_CAP.peak + gguf_cap(gguf.len()).peak + gguf.len(),
            },
            || format!("{} GGUF bytes, then the hashes", gguf.len()),
            || nakshatra_node::vocab::verify(&gguf, &hashes, &f.model_id).is_ok(),
        );
        if ok {
            // Only `general.*` entries (labels, outside the model id by
            // design) and `nakshatra.*` entries other than the two checked
            // (role, source model id) may differ from the model's own
            // vocabulary (see `verify_vocab`).
            let meta = |b: &[u8]| {
                let g = Gguf::from_bytes(b.to_vec(), "vocab").expect("a verified vocab parses");
                let m: Vec<_> = g
                    .metadata()
                    .iter()
                    .filter(|(k, _)| {
                        !k.starts_with("general.")
                            && (!k.starts_with("nakshatra.")
                                || k == "nakshatra.role"
                                || k == "nakshatra.source_model_id")
                    })
                    .cloned()
                    .collect();
                (m, g.tensors().len())
            };
            let (ours, theirs) = (meta(&gguf), meta(&f.vocab));
            if ours != theirs {
                let diff: Vec<_> = ours.0.iter().filter(|e| !theirs.0.contains(e)).collect();
                let gone: Vec<_> = theirs.0.iter().filter(|e| !ours.0.contains(e)).collect();
                panic!(
                    "a vocabulary other than the model's verified: {diff:?} instead of {gone:?}, \
                     tensors {} vs {}",
                    ours.1, theirs.1
                );
            }
        }
        stats.record(ok, usage);
        Ok(())
    });
}

/// The manifest chain of `fetch::manifest`: a signed blob from the peer
/// asked, its payload decoded as a `Manifest` under the manifest cap,
/// checked against the model id and the vocabulary; and the data dir's
/// cached manifest (decoded, then checked). A manifest that passes is the
/// fixture's own, and its ranges can be planned.
#[test]
fn manifests() {
    fuzz("manifests", 65_536, |u, stats| {
        let f = fixture(u)?;
        let manifest_seed = gen::bytes(&f.manifest);
        let signer = u.int_in_range(0..=3u8)?;
        let peer: PeerId = gen::peer_id(signer).parse().expect("a peer id");
        let (input, signed) = match u.int_in_range(0..=3u8)? {
            // The cache: the manifest's bytes as is.
            0 => (mutate::input(u, &[manifest_seed], 1 << 20)?, false),
            // A peer's blob around a mutated manifest, signed by the peer.
            1 | 2 => {
                let body = mutate::input(u, &[manifest_seed], 1 << 20)?;
                (gen::bytes(&gen::signed_blob(u, body)?), true)
            }
            // A mutated blob.
            _ => {
                let blob = gen::bytes(&gen::signed_blob(u, manifest_seed)?);
                (mutate::input(u, &[blob], 1 << 20)?, true)
            }
        };
        let (verified, usage) = check(
            "manifests",
            &input,
            // The blob (and the signed message it rebuilds), the manifest
            // inside it, then the vocabulary's copy and parse.
            Cap {
                largest: DECODE_CAP.largest.max(gguf_cap(f.vocab.len()).largest),
                peak: 2 * DECODE_CAP.peak
                    + 2 * input.len()
                    + gguf_cap(f.vocab.len()).peak
                    + f.vocab.len(),
            },
            || format!("signed: {signed}, expected signer {peer}"),
            || -> Option<Manifest> {
                let body = if signed {
                    SignedBlob::verify(&input, MANIFEST_DOMAIN, Some(&peer), MAX_MANIFEST_BYTES)
                        .ok()?
                        .1
                } else {
                    input.clone()
                };
                let m: Manifest = decode(&body, MAX_MANIFEST_BYTES).ok()?;
                m.verify(&f.model_id, &f.vocab).ok()?;
                Some(m)
            },
        );
        stats.record(verified.is_some(), usage);
        if let Some(m) = verified {
            // What the model id authenticates is the model's own (the
            // tensor lists are only checked for consistency: a piece whose
            // list differs never hashes right, see `Manifest::verify`).
            let authenticated = |m: &Manifest| {
                (
                    m.hashes(),
                    m.pieces
                        .iter()
                        .map(|p| (p.id, p.n_bytes))
                        .collect::<Vec<_>>(),
                    (m.arch.clone(), m.n_layers, m.n_embd, m.n_vocab),
                    (m.tied_embeddings, m.vocab_hash.clone(), m.vocab_bytes),
                )
            };
            assert_eq!(
                authenticated(&m),
                authenticated(&f.manifest),
                "a manifest other than the model's verified"
            );
            let start = u.int_in_range(0..=m.n_layers + 1)?;
            let end = u.int_in_range(0..=m.n_layers + 1)?;
            let _ = (m.pieces_for_range(start, end), m.range_bytes(start, end));
        }
        Ok(())
    });
}

/// The piece hasher on a piece's stream (the real one, or mutated, in
/// any chunking): it holds at most its batch, and accepts exactly the
/// piece.
#[test]
fn piece_hasher() {
    // Every piece's real stream, from the fixture models.
    let pieces: Vec<(&'static Fixture, usize, Vec<u8>)> = fixtures()
        .iter()
        .flat_map(|f| {
            let g = Gguf::from_bytes(f.model_gguf.clone(), "fixture").expect("fixture parses");
            (0..f.manifest.pieces.len())
                .map(|i| {
                    let stream = piece_segments(&g, &f.manifest.pieces[i])
                        .expect("the model holds every piece")
                        .concat();
                    (f, i, stream)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    fuzz("piece_hasher", 16_384, |u, stats| {
        let (f, i, real) = u.choose(&pieces)?;
        let piece = &f.manifest.pieces[*i];
        let input = mutate::input(u, std::slice::from_ref(real), 1 << 16)?;
        let chunks: Vec<usize> = (0..u.int_in_range(1..=8usize)?)
            .map(|_| u.int_in_range(0..=input.len()))
            .collect::<Result<_>>()?;
        let (ok, usage) = check(
            "piece_hasher",
            &input,
            // Its batch (256 KiB) and the tensor list.
            Cap::both(256 * 1024 + 4096),
            || format!("piece {} of {}, chunks {chunks:?}", piece.id, f.model_id),
            || {
                let mut h = PieceHasher::new(piece);
                let mut rest = &input[..];
                for &c in chunks.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (now, later) = rest.split_at(c.clamp(1, rest.len()));
                    h.update(now);
                    rest = later;
                }
                assert_eq!(h.bytes_received(), input.len() as u64);
                h.finalize().is_ok()
            },
        );
        assert_eq!(
            ok,
            input == *real,
            "piece {}: accepted a wrong stream",
            piece.id
        );
        stats.record(ok, usage);
        Ok(())
    });
}

/// Hand-built GGUF files that make the parser allocate the most per file
/// byte: many tiny metadata entries, arrays of empty strings and of empty
/// arrays, many tiny tensors; each whole, and each claiming far more
/// entries than it holds. All stay within [`gguf_cap`].
#[test]
fn gguf_worst_cases() {
    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    }
    fn key(b: &mut Vec<u8>, k: &str) {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
    }
    const N: u64 = 20_000;
    let names: Vec<String> = (0..N).map(|i| format!("{i:x}")).collect();
    let mut cases: Vec<(&str, u64, u64, Vec<u8>)> = Vec::new();
    // N entries `k: u8`.
    let mut body = Vec::new();
    for k in &names {
        key(&mut body, k);
        body.extend_from_slice(&0u32.to_le_bytes());
        body.push(7);
    }
    cases.push(("tiny entries", 0, N, body));
    // One array of N empty strings, and one of N empty u8 arrays.
    for (what, elem, each) in [
        ("empty strings", 8u32, vec![0u8; 8]),
        (
            "empty arrays",
            0,
            [0u32.to_le_bytes().to_vec(), vec![0; 8]].concat(),
        ),
    ] {
        let mut body = Vec::new();
        key(&mut body, "a");
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&(if elem == 8 { 8u32 } else { 9u32 }).to_le_bytes());
        body.extend_from_slice(&N.to_le_bytes());
        for _ in 0..N {
            body.extend_from_slice(&each);
        }
        cases.push((what, 0, 1, body));
    }
    // N scalar F32 tensors, all at offset 0, then their 4 data bytes.
    let mut body = Vec::new();
    for k in &names {
        key(&mut body, k);
        body.extend_from_slice(&0u32.to_le_bytes()); // n_dims
        body.extend_from_slice(&0u32.to_le_bytes()); // F32
        body.extend_from_slice(&0u64.to_le_bytes()); // offset
    }
    cases.push(("tiny tensors", N, 0, body));

    for (what, n_tensors, n_kv, body) in cases {
        let padded = |mut b: Vec<u8>| {
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
            b.extend_from_slice(&[0; 32]);
            b
        };
        let whole = padded([header(n_tensors, n_kv), body.clone()].concat());
        // The same entries, claiming twice as many (a truncated file).
        let claims = [header(n_tensors * 2, n_kv * 2), body].concat();
        for (input, must_parse) in [(whole, true), (claims, false)] {
            let (ok, usage) = check(
                "gguf_worst_cases",
                &input,
                gguf_cap(input.len()).plus(input.len()),
                || what.to_string(),
                || Gguf::from_bytes(input.clone(), "worst").map_err(|e| e.to_string()),
            );
            assert_eq!(ok.is_ok(), must_parse, "{what}: {ok:?}");
            eprintln!(
                "gguf worst case {what} ({} bytes, parses: {must_parse}): largest {:.2}×, peak {:.2}× the file",
                input.len(),
                usage.largest as f64 / input.len() as f64,
                usage.peak as f64 / input.len() as f64
            );
        }
    }
}
