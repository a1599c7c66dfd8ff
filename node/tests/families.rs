//! Every supported model family splits exactly: a tiny random-weight model
//! of each (written by `scripts/gen-test-models.sh` with llama.cpp's real
//! tensor names and metadata) run whole and as two- and three-way chains,
//! 4 prompts x 32 greedy tokens, logits compared bit for bit at every step.
//! The cuts sit next to each family's special layers: DeepSeek-2's first
//! MoE block after its dense one, the sliding/global boundaries of the
//! windowed families, odd layers where a window pattern alternates.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nakshatra_node::engine::tokenizer::Tokenizer;
use nakshatra_slicer::SliceError;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
];

/// Tokens generated per prompt.
const TOKENS: u32 = 32;

/// Each family with its two- and three-way cuts, and why those cuts.
const CASES: &[(&str, &[u32], &[u32])] = &[
    ("llama", &[3], &[2, 4]),
    ("mistral3", &[3], &[1, 5]),
    ("qwen2", &[3], &[2, 4]),
    ("qwen3", &[3], &[2, 4]),
    // Shared experts and a required head (placeholder in non-last slices).
    ("qwen2moe", &[3], &[1, 4]),
    ("qwen3moe", &[3], &[2, 4]),
    // 8 layers, pattern 6: layer 5 is global. Cuts on both sides of it and
    // at odd layers (the local index would shift the pattern).
    ("gemma3", &[5], &[3, 6]),
    ("phi3", &[3], &[2, 4]),
    // Layer 0 dense, then MoE: a cut right after the dense layer.
    ("deepseek2", &[1], &[1, 4]),
    // 8 layers, pattern 2 (even layers slide): odd cuts.
    ("gpt-oss", &[3], &[3, 5]),
    // 8 layers, pattern 4: layers 3 and 7 global.
    ("olmo2", &[3], &[3, 4]),
];

fn model_of(arch: &str) -> PathBuf {
    family_models().join(format!("{arch}.gguf"))
}

fn exact(arch: &str, cuts_2: &[u32], cuts_3: &[u32]) {
    let _g = heavy();
    let m = model_of(arch);
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(1, 512);
    let tok = Tokenizer::load(&m).unwrap();
    let mut whole = chain_of(&m, dir.path(), &[], &cfg);
    let mut chains: Vec<_> = [cuts_2, cuts_3]
        .iter()
        .map(|c| (c.to_vec(), chain_of(&m, dir.path(), c, &cfg)))
        .collect();
    let params = greedy(TOKENS, true);
    let mut distinct = std::collections::HashSet::new();
    for prompt in PROMPTS {
        let toks = tok.tokenize(prompt);
        let reference = run_once(&mut whole, &toks, &params);
        assert!(!reference.tokens.is_empty(), "{arch}: no token generated");
        distinct.extend(reference.tokens.iter().copied());
        for (cuts, ch) in &mut chains {
            let got = run_once(ch, &toks, &params);
            assert_eq!(
                got.tokens, reference.tokens,
                "{arch} split {cuts:?}: tokens differ"
            );
            assert_eq!(got.logits.len(), reference.logits.len());
            let worst = reference
                .logits
                .iter()
                .zip(&got.logits)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0f32, f32::max);
            eprintln!(
                "{arch} split {cuts:?} prompt {prompt:?}: {} steps, max |logit diff| = {worst}",
                got.logits.len()
            );
            assert_eq!(
                worst, 0.0,
                "{arch} split {cuts:?}: logits not bit-identical"
            );
        }
    }
    // Random weights, but not a constant model: the comparison means
    // something only if different inputs give different outputs.
    assert!(
        distinct.len() > 2,
        "{arch}: the whole model generates only {distinct:?}"
    );
}

macro_rules! family_tests {
    ($($name:ident => $arch:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let (_, c2, c3) = CASES
                    .iter()
                    .find(|(a, _, _)| *a == $arch)
                    .expect("a case for the family");
                exact($arch, c2, c3);
            }
        )*
    };
}

family_tests! {
    llama_splits_exactly => "llama",
    mistral3_splits_exactly => "mistral3",
    qwen2_splits_exactly => "qwen2",
    qwen3_splits_exactly => "qwen3",
    qwen2moe_splits_exactly => "qwen2moe",
    qwen3moe_splits_exactly => "qwen3moe",
    gemma3_splits_exactly => "gemma3",
    phi3_splits_exactly => "phi3",
    deepseek2_splits_exactly => "deepseek2",
    gpt_oss_splits_exactly => "gpt-oss",
    olmo2_splits_exactly => "olmo2",
}

/// Every family the slicer supports has a case above (or a refusal test).
#[test]
fn every_family_is_tested() {
    for f in nakshatra_slicer::FAMILIES {
        assert!(
            CASES.iter().any(|(a, _, _)| *a == f.arch) || f.hidden_input_refused.is_some(),
            "no exactness case for {}",
            f.arch
        );
    }
}

fn slice_err(m: &Path, start: u32, end: u32) -> SliceError {
    let dir = tempfile::tempdir().unwrap();
    nakshatra_slicer::write_slice(m, start, end, &dir.path().join("s.gguf"))
        .expect_err("the range must be refused")
}

/// Gemma 2 scales every input of its first layer in the graph, hidden
/// states included: no slice of it can be exact, so slicing is refused
/// with the reason, and the whole model still runs.
#[test]
fn gemma2_is_served_whole_and_never_split() {
    let m = model_of("gemma2");
    for (start, end) in [(0, 4), (4, 8), (2, 5)] {
        let e = slice_err(&m, start, end);
        assert!(
            matches!(e, SliceError::RangeRefused { .. }) && e.to_string().contains("sqrt(n_embd)"),
            "{e}"
        );
    }
    // `model inspect` names the family and says why it is not split.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_nakshatra"))
        .args(["model", "inspect"])
        .arg(&m)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("family:     Gemma 2 (dense)"), "{text}");
    assert!(
        text.contains("splits:     refused: Gemma 2 multiplies every layer-0 input"),
        "{text}"
    );
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut whole = chain_of(&m, dir.path(), &[], &cfg(1, 512));
    let toks = Tokenizer::load(&m).unwrap().tokenize(PROMPTS[0]);
    let g = run_once(&mut whole, &toks, &greedy(8, false));
    assert!(!g.tokens.is_empty());
}

/// A node serving a range of an MoE model holds only its blocks' experts,
/// and `--layers auto` sizes MoE blocks by what they hold: the qwen3moe
/// and qwen3 test models share width, heads and layer count, but an MoE
/// block carries 4 experts and a router, so fewer of them fit a budget.
#[test]
fn moe_blocks_are_sized_by_their_experts() {
    use nakshatra_swarm::build_model_view;
    let moe = nakshatra_slicer::manifest(&model_of("qwen3moe")).unwrap();
    let dense = nakshatra_slicer::manifest(&model_of("qwen3")).unwrap();
    assert_eq!((moe.n_layers, moe.n_embd), (dense.n_layers, dense.n_embd));
    let block = |m: &nakshatra_slicer::Manifest| m.range_bytes(2, 3);
    eprintln!(
        "block bytes: qwen3moe {} vs qwen3 {}",
        block(&moe),
        block(&dense)
    );
    assert!(block(&moe) > block(&dense), "an MoE block must weigh more");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_nakshatra"))
        .args(["model", "inspect"])
        .arg(model_of("qwen3moe"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("family:     Qwen 3 MoE (mixture of experts)")
            && text.contains("splits:     exact"),
        "{text}"
    );

    // A middle slice of the MoE model: its file holds exactly the experts
    // of its own blocks (renumbered), none of the others'.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe-2-4.gguf");
    nakshatra_slicer::write_slice(&model_of("qwen3moe"), 2, 4, &out).unwrap();
    let g = nakshatra_slicer::Gguf::open(&out).unwrap();
    let experts: Vec<&str> = g
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.contains("_exps"))
        .collect();
    assert_eq!(
        experts.len(),
        2 * 3,
        "gate/up/down experts of 2 blocks: {experts:?}"
    );
    assert!(experts
        .iter()
        .all(|n| n.starts_with("blk.0.") || n.starts_with("blk.1.")));
    let slice_bytes: u64 = g.tensors().iter().map(|t| t.n_bytes).sum();
    let range = moe.range_bytes(2, 4);
    eprintln!("slice 2..4 tensor bytes {slice_bytes}, manifest range bytes {range}");
    assert!(
        slice_bytes <= range + 64 * 1024 && range <= slice_bytes + 64 * 1024,
        "the slice holds {slice_bytes} bytes of tensors, the manifest says {range}"
    );

    // Nothing served: the budget of four dense middle blocks (plus the
    // embedding and globals) fits fewer MoE blocks.
    let view = |m: &nakshatra_slicer::Manifest| {
        let none: Vec<(nakshatra_swarm::PeerId, nakshatra_swarm::ServerInfo)> = Vec::new();
        build_model_view(&m.model_id, &none, &Default::default())
    };
    let budget = dense.range_bytes(0, 4);
    let (d, _) =
        nakshatra_node::placement::choose_range(&dense, &view(&dense), budget, None).unwrap();
    let (m, why) =
        nakshatra_node::placement::choose_range(&moe, &view(&moe), budget, None).unwrap();
    eprintln!("budget {budget}: dense {d:?}, moe {m:?} ({why})");
    assert_eq!(d, 0..4);
    assert!(m.len() < d.len(), "MoE blocks are bigger: {m:?} vs {d:?}");
}
