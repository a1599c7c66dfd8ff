//! A chain of slices computes exactly what the whole model computes: the
//! original GGUF run the ordinary way (token ids in, logits out, one
//! context) against 2-, 3- and 5-way splits, greedy, logits compared at
//! every step.

mod common;

use common::*;
use nakshatra_node::engine::pipeline::generate;
use nakshatra_node::engine::tokenizer::Tokenizer;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
];

fn tokens(text: &str) -> Vec<i32> {
    Tokenizer::load(&model()).unwrap().tokenize(text)
}

/// Greedy 32 tokens and the logits of every step, whole vs split.
#[test]
fn splits_match_whole_model_bit_for_bit() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(1, 512);
    let mut whole = chain(dir.path(), &[], &cfg);
    let splits: &[&[u32]] = &[&[15], &[10, 20], &[6, 12, 18, 24]];
    let mut chains: Vec<_> = splits
        .iter()
        .map(|c| (c.to_vec(), chain(dir.path(), c, &cfg)))
        .collect();
    let params = greedy(32, true);
    for prompt in PROMPTS {
        let toks = tokens(prompt);
        let reference = run_once(&mut whole, &toks, &params);
        assert_eq!(reference.tokens.len(), 32);
        for (cuts, ch) in &mut chains {
            let got = run_once(ch, &toks, &params);
            let diffs: Vec<f32> = reference
                .logits
                .iter()
                .zip(&got.logits)
                .map(|(a, b)| max_abs_diff(a, b))
                .collect();
            let worst = diffs.iter().copied().fold(0.0f32, f32::max);
            eprintln!(
                "split {cuts:?} prompt {prompt:?}: {} steps, max |logit diff| = {worst}",
                diffs.len()
            );
            assert_eq!(got.tokens, reference.tokens, "split {cuts:?} tokens differ");
            assert_eq!(diffs.len(), reference.logits.len());
            assert_eq!(worst, 0.0, "split {cuts:?}: logits not bit-identical");
        }
    }
}

/// A prompt longer than one micro-batch (prefill in several ubatches), then
/// decode with KV reuse: still identical.
#[test]
fn multi_ubatch_prefill_matches() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let text = "The history of the printing press begins in the fifteenth century. ".repeat(16);
    let toks = tokens(&text);
    assert!(toks.len() > 3 * 64, "prompt has {} tokens", toks.len());
    let params = greedy(16, true);
    // Reference: the whole model with the default micro-batch (one ubatch).
    let mut whole = chain(dir.path(), &[], &cfg(1, 512));
    let reference = run_once(&mut whole, &toks, &params);
    for ubatch in [512u32, 64] {
        let mut whole_small = chain(dir.path(), &[], &cfg(1, ubatch));
        let mut split = chain(dir.path(), &[10, 20], &cfg(1, ubatch));
        let w = run_once(&mut whole_small, &toks, &params);
        let s = run_once(&mut split, &toks, &params);
        let worst = w
            .logits
            .iter()
            .zip(&s.logits)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0f32, f32::max);
        eprintln!(
            "{} prompt tokens, ubatch {ubatch}: split vs whole max |logit diff| = {worst}",
            toks.len()
        );
        assert_eq!(s.tokens, w.tokens);
        assert_eq!(worst, 0.0);
        if ubatch == 512 {
            assert_eq!(w.tokens, reference.tokens);
        }
    }
}

/// Two sessions interleaved step by step give the same tokens as each
/// alone; truncating to p and decoding again reproduces the same tokens.
#[test]
fn sessions_interleave_and_truncate() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut ch = chain(dir.path(), &[10, 20], &cfg(4, 512));
    let params = greedy(20, false);
    let pa = tokens(PROMPTS[0]);
    let pb = tokens(PROMPTS[1]);
    let alone_a = run_once(&mut ch, &pa, &params).tokens;
    let alone_b = run_once(&mut ch, &pb, &params).tokens;

    // Interleave by hand: one step of A, one of B, ...
    let sa = ch.open().unwrap();
    let sb = ch.open().unwrap();
    let mut sampler_a = nakshatra_node::engine::Sampler::new(&params.sampler).unwrap();
    let mut sampler_b = nakshatra_node::engine::Sampler::new(&params.sampler).unwrap();
    let mut la = ch.step(&sa, &pa).unwrap();
    let mut lb = ch.step(&sb, &pb).unwrap();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for step in 0..20u64 {
        let a = sampler_a.sample(&la, step).unwrap();
        ta.push(a);
        la = ch.step(&sa, &[a]).unwrap();
        let b = sampler_b.sample(&lb, step).unwrap();
        tb.push(b);
        lb = ch.step(&sb, &[b]).unwrap();
    }
    assert_eq!(ta, alone_a, "interleaved session A drifted");
    assert_eq!(tb, alone_b, "interleaved session B drifted");
    assert_ne!(ta, tb);

    // Truncate A back to prompt + 5 tokens and decode again.
    let p = (pa.len() + 5) as u32;
    ch.truncate(&sa, p).unwrap();
    assert_eq!(ch.position(&sa).unwrap(), p);
    let mut sampler = nakshatra_node::engine::Sampler::new(&params.sampler).unwrap();
    let mut logits = ch.step(&sa, &[ta[5]]).unwrap();
    let mut again = Vec::new();
    for step in 6..20u64 {
        let t = sampler.sample(&logits, step).unwrap();
        again.push(t);
        logits = ch.step(&sa, &[t]).unwrap();
    }
    assert_eq!(again, ta[6..20], "decoding after truncation differs");
    // B was untouched by A's truncation.
    assert_eq!(ch.position(&sb).unwrap(), (pb.len() + 20) as u32);
    ch.close(sa);
    ch.close(sb);

    // A fresh session after closing reuses a freed slot with an empty cache.
    let s = ch.open().unwrap();
    let g = generate(&mut ch, &s, &pa, &params, |_| false, |_| {}).unwrap();
    assert_eq!(g.tokens, alone_a);
}

/// What recovery and `node ask --verify` stand on: a session replayed in
/// the replay's shapes (the prompt as the one step it was, then the
/// generated tokens in steps of at most `REPLAY_CHUNK`) gives every
/// position, bit for bit, the logits the original one-token steps gave.
/// A short prompt and one longer than 64 tokens (whose own step is
/// replayed as it was), whole model and a 3-way split.
#[test]
fn chunked_replay_matches_step_by_step() {
    use nakshatra_node::ask::REPLAY_CHUNK;
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let long = "The history of the printing press begins in the fifteenth century. ".repeat(6);
    for text in [PROMPTS[1], long.as_str()] {
        let toks = tokens(text);
        for cuts in [&[][..], &[10, 20][..]] {
            let mut ch = chain(dir.path(), cuts, &cfg(1, 512));
            let reference = run_once(&mut ch, &toks, &greedy(40, true));
            let n = reference.tokens.len() - 1;
            let s = ch.open().unwrap();
            let first = ch.step(&s, &toks).unwrap();
            assert_eq!(max_abs_diff(&first, &reference.logits[0]), 0.0);
            let mut fed = 0;
            while fed < n {
                let end = (fed + REPLAY_CHUNK).min(n);
                let got = ch.step(&s, &reference.tokens[fed..end]).unwrap();
                let diff = max_abs_diff(&got, &reference.logits[end]);
                assert_eq!(
                    diff,
                    0.0,
                    "prompt of {} tokens, split {cuts:?}: the replay of tokens {fed}..{end} differs",
                    toks.len()
                );
                fed = end;
            }
            ch.close(s);
        }
    }
}
