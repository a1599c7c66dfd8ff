//! What speculative decoding and replays stand on: a step of several
//! positions that stands for one-token steps (`LocalChain::step_rows`,
//! `SliceEngine::forward_as_singles`) gives every position the logits,
//! bit for bit, that one-token steps give it, at widths 2, 5 and 9, past
//! 512 positions of KV (where ggml-cpu's flash attention splits a
//! one-token decode's KV by thread), with one or two threads for
//! one-token decodes, whole model and split.

mod common;

use common::*;
use nakshatra_node::engine::greedy_token;
use nakshatra_node::engine::tokenizer::Tokenizer;

#[test]
fn verify_rows_equal_one_token_steps() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let toks = Tokenizer::load(&model())
        .unwrap()
        .tokenize("Once upon a time, in a small village by the sea,");
    // (cuts, KV before the verified rows, one-token threads, batch
    // threads). One-token steps on one thread: the verify is one batch
    // (what the engine relies on, past the 512-position split-KV
    // threshold, whole and split); on two: one decode per row.
    let cases: &[(&[u32], usize, u32, u32)] = &[
        (&[], 700, 1, 2),
        (&[10, 20], 700, 1, 2),
        (&[], 700, 2, 2),
        (&[], 0, 2, 2),
    ];
    for &(cuts, prefix, single, batch) in cases {
        let mut c = cfg(1, 512);
        c.ctx_per_session = 2048;
        let mut ch = chain(dir.path(), cuts, &c);
        ch.set_thread_counts(single, batch);
        let mut prompt: Vec<i32> = Vec::new();
        while prompt.len() < prefix {
            prompt.extend_from_slice(&toks);
        }
        prompt.extend_from_slice(&toks);
        // Reference: one-token steps.
        let s = ch.open().unwrap();
        let mut logits = vec![ch.step(&s, &prompt).unwrap()];
        let mut gen = Vec::new();
        for _ in 0..18 {
            let t = greedy_token(logits.last().unwrap()).unwrap();
            gen.push(t);
            logits.push(ch.step(&s, &[t]).unwrap());
        }
        // The verifies run on the same session, rolled back to the end of
        // the prompt first (as the speculative path drops rejected rows):
        // one prefill per case, and the roll-back is checked with them.
        let nv = logits[0].len();
        let end = u32::try_from(prompt.len()).unwrap();
        for w in [2usize, 5, 9] {
            ch.truncate(&s, end).unwrap();
            assert_eq!(ch.position(&s).unwrap(), end);
            let mut i = 0;
            while i + w <= gen.len() {
                let rows = ch.step_rows(&s, &gen[i..i + w], w).unwrap();
                assert_eq!(rows.len(), w * nv);
                for r in 0..w {
                    assert!(
                        rows[r * nv..(r + 1) * nv] == logits[i + r + 1][..],
                        "split {cuts:?}, {} positions of KV, threads {single}/{batch}: \
                         row {r} of a {w}-wide verify at token {i} differs",
                        prompt.len()
                    );
                }
                i += w;
            }
        }
        ch.close(s);
    }
}
