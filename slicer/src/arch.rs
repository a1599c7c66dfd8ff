//! What each model family needs for a slice to compute exactly what its
//! layers compute inside the whole model: one table ([`FAMILIES`]), read
//! by the slice writer (metadata rewrites, tensors, ranges it refuses) and
//! by the engine (how the first hop feeds token rows).
//!
//! A slice renumbers its layers from 0 and says it has `end - start` of
//! them, so anything llama.cpp derives from a layer's index, from the layer
//! count or from the vocabulary size is computed slice-locally. Each row
//! below lists what that changes for the family and what the slice writes
//! so that it does not (facts from llama.cpp's `src/models/<arch>.cpp`):
//!
//! - **Per-layer arrays** (`feed_forward_length`, head counts, expert
//!   sizes): cut to the slice's layers.
//! - **Sliding-window pattern**: llama.cpp computes which layers use the
//!   window from the *local* index (`il % n_pattern`), so every slice of a
//!   family with one gets the pattern written out as a bool array
//!   (`{arch}.attention.sliding_window_pattern`), cut from the whole
//!   model's.
//! - **Output head required**: some families refuse to load without
//!   `output.weight`; a non-last slice (whose vocabulary is 1 token) gets a
//!   zero `[n_embd, 1]` placeholder, like the token embedding's.
//! - **Token scaling**: Gemma multiplies looked-up token rows by
//!   `sqrt(n_embd)` in the graph, but only rows llama.cpp looked up itself;
//!   the first hop of a split model feeds rows it read from the sidecar, so
//!   it applies the same f32 multiply before feeding them.
//! - **Refusals**: where no metadata can make a slice exact, the range is
//!   refused with the reason (Gemma 2 scales every input, hidden states
//!   included; the 27B Gemmas pick their attention scale from the layer
//!   count; some DeepSeek-2 slice lengths switch llama.cpp's "lite"
//!   detection).

use crate::error::SliceError;
use crate::gguf::value::{MetaArray, MetaValue};

/// How a family decides which layers use sliding-window attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swa {
    /// llama.cpp's default `n_pattern` when the model has no
    /// `attention.sliding_window_pattern` key: layer `il` slides unless
    /// `il % n_pattern == n_pattern - 1`.
    pub default_pattern: u32,
    /// Whether the window is on only when `attention.sliding_window` is
    /// present and non-zero (Gemma 3, OLMo 2), rather than always.
    pub needs_window_key: bool,
}

/// How the first hop must scale the token rows it feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScale {
    /// Rows are fed as looked up.
    None,
    /// Rows are multiplied by `sqrtf(n_embd)` (f32), as llama.cpp's
    /// `build_inp_embd(tok_embd, sqrtf(n_embd))` does to token rows.
    SqrtNEmbd,
}

/// One model family (a value of `general.architecture`).
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// `general.architecture`.
    pub arch: &'static str,
    /// A short human name for tables and messages.
    pub name: &'static str,
    /// Whether blocks hold routed experts (memory per block is far above
    /// the active parameters).
    pub moe: bool,
    /// Keys (after `{arch}.`) that hold one value per layer when they are
    /// arrays, besides [`BASE_PER_LAYER`].
    pub per_layer: &'static [&'static str],
    /// Sliding-window attention, if the family has it.
    pub swa: Option<Swa>,
    /// Whether llama.cpp refuses to load the family without
    /// `output.weight` (non-last slices get a placeholder).
    pub head_required: bool,
    /// What the first hop does to token rows.
    pub token_scale: TokenScale,
    /// Set when slices that do not start at layer 0 cannot be exact: why.
    pub hidden_input_refused: Option<&'static str>,
    /// The layer count at which llama.cpp picks a different attention
    /// scale (the 27B models of the Gemma families): slices of a model with
    /// this many layers are refused when it matters.
    pub scale_by_layer_count: Option<u32>,
    /// DeepSeek-2's per-slice rewrites (leading dense blocks, "lite"
    /// detection, gating function).
    pub deepseek: bool,
}

impl Family {
    const fn plain(arch: &'static str, name: &'static str) -> Family {
        Family {
            arch,
            name,
            moe: false,
            per_layer: &[],
            swa: None,
            head_required: false,
            token_scale: TokenScale::None,
            hidden_input_refused: None,
            scale_by_layer_count: None,
            deepseek: false,
        }
    }

    /// The factor the first hop multiplies token rows by, if any.
    pub fn token_scale_for(&self, n_embd: u32) -> Option<f32> {
        match self.token_scale {
            TokenScale::None => None,
            // `sqrtf` in C and `f32::sqrt` are both correctly rounded.
            TokenScale::SqrtNEmbd => Some((n_embd as f32).sqrt()),
        }
    }
}

/// Keys (after `{arch}.`) llama.cpp reads per layer for every family
/// (`get_key_or_arr(..., n_layer)`): arrays of them are cut to a slice.
pub const BASE_PER_LAYER: &[&str] = &[
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
];

/// `{arch}.attention.sliding_window_pattern` (after `{arch}.`).
const SWA_PATTERN: &str = "attention.sliding_window_pattern";
/// `{arch}.attention.sliding_window` (after `{arch}.`).
const SWA_WINDOW: &str = "attention.sliding_window";

const MOE_PER_LAYER: &[&str] = &["expert_feed_forward_length"];

const GEMMA2_REFUSAL: &str =
    "Gemma 2 multiplies every layer-0 input by sqrt(n_embd) inside the graph, \
     hidden states fed to a later slice included, and no metadata turns that off; \
     serve it whole (one node, --layers 0..N)";

/// Every family nakshatra slices, one row each.
pub static FAMILIES: &[Family] = &[
    Family::plain("llama", "Llama (Llama 2/3, SmolLM, Mistral 7B)"),
    Family::plain("mistral3", "Mistral 3"),
    Family::plain("qwen2", "Qwen 2 / 2.5"),
    Family::plain("qwen3", "Qwen 3"),
    Family {
        moe: true,
        per_layer: MOE_PER_LAYER,
        head_required: true,
        ..Family::plain("qwen2moe", "Qwen 2 MoE")
    },
    Family {
        moe: true,
        per_layer: MOE_PER_LAYER,
        ..Family::plain("qwen3moe", "Qwen 3 MoE")
    },
    Family {
        swa: Some(Swa {
            default_pattern: 6,
            needs_window_key: true,
        }),
        token_scale: TokenScale::SqrtNEmbd,
        scale_by_layer_count: Some(62),
        ..Family::plain("gemma3", "Gemma 3")
    },
    Family {
        swa: Some(Swa {
            default_pattern: 2,
            needs_window_key: false,
        }),
        hidden_input_refused: Some(GEMMA2_REFUSAL),
        scale_by_layer_count: Some(46),
        ..Family::plain("gemma2", "Gemma 2")
    },
    Family::plain("phi3", "Phi 3 / 4"),
    Family {
        moe: true,
        per_layer: MOE_PER_LAYER,
        deepseek: true,
        ..Family::plain("deepseek2", "DeepSeek 2 / 3 / R1 (MLA)")
    },
    Family {
        moe: true,
        per_layer: MOE_PER_LAYER,
        swa: Some(Swa {
            default_pattern: 2,
            needs_window_key: false,
        }),
        head_required: true,
        ..Family::plain("gpt-oss", "gpt-oss")
    },
    Family {
        swa: Some(Swa {
            default_pattern: 4,
            needs_window_key: true,
        }),
        head_required: true,
        ..Family::plain("olmo2", "OLMo 2 / 3")
    },
];

/// The row for `arch`, or [`SliceError::UnsupportedArch`].
pub fn family(arch: &str) -> Result<&'static Family, SliceError> {
    FAMILIES
        .iter()
        .find(|f| f.arch == arch)
        .ok_or_else(|| SliceError::UnsupportedArch { arch: arch.into() })
}

/// The whole model's metadata, as the table's rules read it.
pub(crate) struct Meta<'a> {
    pub metadata: &'a [(String, MetaValue)],
    pub arch: &'a str,
    /// Layers of the whole model.
    pub n_layers: u32,
}

impl Meta<'_> {
    fn get(&self, rel: &str) -> Option<&MetaValue> {
        let key = format!("{}.{rel}", self.arch);
        self.metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn u64(&self, rel: &str) -> Option<u64> {
        self.get(rel).and_then(MetaValue::as_u64)
    }

    /// Vocabulary size: `{arch}.vocab_size`, else the token list's length.
    fn n_vocab(&self) -> Option<u64> {
        self.u64("vocab_size").or_else(|| {
            self.metadata
                .iter()
                .find(|(k, _)| k == "tokenizer.ggml.tokens")
                .and_then(|(_, v)| v.as_array())
                .map(|a| a.len() as u64)
        })
    }

    /// Which layers of the whole model slide, when the family has a
    /// window and it is on: the model's own array, else llama.cpp's
    /// `set_swa_pattern` over the whole model's layer indices.
    fn swa_layers(&self, swa: Swa) -> Result<Option<Vec<bool>>, SliceError> {
        if swa.needs_window_key && self.u64(SWA_WINDOW).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let n = self.n_layers as usize;
        let key = || format!("{}.{SWA_PATTERN}", self.arch);
        match self.get(SWA_PATTERN) {
            Some(MetaValue::Array(a)) => {
                let flags: Option<Vec<bool>> = match a {
                    MetaArray::Bool(v) => Some(v.clone()),
                    MetaArray::I32(v) => Some(v.iter().map(|&x| x != 0).collect()),
                    MetaArray::U32(v) => Some(v.iter().map(|&x| x != 0).collect()),
                    _ => None,
                };
                match flags {
                    Some(f) if f.len() == n => Ok(Some(f)),
                    _ => Err(SliceError::BadKey {
                        key: key(),
                        reason: format!("expected {n} bools, int32s or uint32s"),
                    }),
                }
            }
            other => {
                let pattern = match other {
                    None => swa.default_pattern,
                    Some(v) => v.as_u32().ok_or_else(|| SliceError::BadKey {
                        key: key(),
                        reason: "not an unsigned integer".into(),
                    })?,
                };
                Ok(Some(
                    (0..self.n_layers)
                        .map(|il| pattern == 0 || il % pattern < pattern - 1)
                        .collect(),
                ))
            }
        }
    }
}

/// A model's family rules for ranges, kept to check many candidate ranges
/// (`--layers auto`) without the model file: built from its metadata (the
/// model's, or its vocabulary file's, which has all of it) and its layer
/// count.
#[derive(Debug, Clone)]
pub struct RangeRules {
    arch: String,
    n_layers: u32,
    /// `{arch}.*` keys (plus a `vocab_size` when the model has none).
    metadata: Vec<(String, MetaValue)>,
}

impl RangeRules {
    /// The rules of a model with this metadata and `n_layers` layers;
    /// [`SliceError::UnsupportedArch`] for a family the table lacks.
    pub fn new(metadata: &[(String, MetaValue)], n_layers: u32) -> Result<Self, SliceError> {
        let arch = metadata
            .iter()
            .find(|(k, _)| k == crate::keys::ARCH)
            .and_then(|(_, v)| v.as_str())
            .ok_or_else(|| SliceError::MissingKey(crate::keys::ARCH.into()))?
            .to_string();
        family(&arch)?;
        let prefix = format!("{arch}.");
        let mut kept: Vec<(String, MetaValue)> = metadata
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .cloned()
            .collect();
        let full = Meta {
            metadata,
            arch: &arch,
            n_layers,
        };
        if full.u64("vocab_size").is_none() {
            if let Some(n) = full.n_vocab() {
                kept.push((format!("{arch}.vocab_size"), MetaValue::U64(n)));
            }
        }
        Ok(RangeRules {
            arch,
            n_layers,
            metadata: kept,
        })
    }

    /// `Ok` if `start..end` can be served exactly, else why not.
    pub fn check(&self, start: u32, end: u32) -> Result<(), SliceError> {
        crate::slice::check_range(start, end, self.n_layers)?;
        check_slice_range(
            &Meta {
                metadata: &self.metadata,
                arch: &self.arch,
                n_layers: self.n_layers,
            },
            start,
            end,
        )
    }
}

/// `Ok` if layers `start..end` of the model at `path` (a GGUF, or the
/// first shard of a split one) can be served as a slice that computes
/// exactly what they compute in the whole model; else why not
/// ([`SliceError::RangeRefused`], or the range or the architecture being
/// wrong). Reads the header only.
pub fn check_model_range(path: &std::path::Path, start: u32, end: u32) -> Result<(), SliceError> {
    let g = crate::gguf::read::Gguf::open(path)?;
    let arch = crate::info::arch_of(&g)?;
    let n_layers = crate::info::n_layers_of(&g, &arch)?;
    RangeRules::new(g.metadata(), n_layers)?.check(start, end)
}

/// Why a range of a model cannot be sliced exactly, if it cannot.
pub(crate) fn check_slice_range(m: &Meta<'_>, start: u32, end: u32) -> Result<(), SliceError> {
    let f = family(m.arch)?;
    let whole = start == 0 && end == m.n_layers;
    if whole {
        return Ok(());
    }
    let refuse = |reason: String| SliceError::RangeRefused {
        arch: m.arch.to_string(),
        start,
        end,
        reason,
    };
    if let Some(why) = f.hidden_input_refused {
        return Err(refuse(why.into()));
    }
    if let Some(swa) = f.swa.filter(|s| !s.needs_window_key) {
        let layers = m.swa_layers(swa)?.unwrap_or_default();
        let slides = layers.get(start as usize..end as usize).unwrap_or(&[]);
        if !slides.iter().any(|&s| s) {
            return Err(refuse(
                "none of these layers uses the sliding window, and llama.cpp cannot load a \
                 model of this family without one (it always has the window on); \
                 take a range with at least one sliding-window layer"
                    .into(),
            ));
        }
    }
    if let Some(at) = f.scale_by_layer_count {
        // llama.cpp: attention scale 1/sqrt(n_embd/n_head) for the 27B
        // model (recognised by its layer count), else 1/sqrt(head_dim).
        let n_embd = m.u64("embedding_length").unwrap_or(0);
        let n_head = head_count_of_layer0(m).unwrap_or(0);
        let head_dim = m
            .u64("attention.key_length")
            .or_else(|| n_embd.checked_div(n_head))
            .unwrap_or(0);
        let differs = n_head > 0 && n_embd / n_head != head_dim;
        if differs && (m.n_layers == at || end - start == at) {
            return Err(refuse(format!(
                "llama.cpp picks this family's attention scale from the layer count ({at} layers \
                 means 1/sqrt(n_embd/n_head) = 1/sqrt({}), else 1/sqrt(head_dim) = 1/sqrt({head_dim})), \
                 so a {}-layer slice of a {}-layer model would compute another scale",
                n_embd / n_head,
                end - start,
                m.n_layers
            )));
        }
    }
    if f.deepseek {
        check_deepseek_range(m, start, end).map_err(refuse)?;
    }
    Ok(())
}

fn head_count_of_layer0(m: &Meta<'_>) -> Option<u64> {
    match m.get("attention.head_count")? {
        MetaValue::Array(a) => a.sub_array(0..1).and_then(|a| match a {
            MetaArray::U32(v) => v.first().map(|&x| u64::from(x)),
            MetaArray::I32(v) => v.first().and_then(|&x| u64::try_from(x).ok()),
            _ => None,
        }),
        v => v.as_u64(),
    }
}

/// DeepSeek-2 (`models/deepseek2.cpp`): "lite" is recognised by the layer
/// count (26 or 27, or 48 with a 128,256-token vocabulary), and a lite
/// model reads no `q_lora_rank` (its attention has a plain `attn_q`).
fn is_lite(n_layers: u32, n_vocab: Option<u64>) -> bool {
    n_layers == 26 || n_layers == 27 || (n_layers == 48 && n_vocab == Some(128_256))
}

/// The vocabulary a slice's metadata will show: the model's for the last
/// slice, 1 for the others.
fn slice_vocab(m: &Meta<'_>, end: u32) -> Option<u64> {
    if end == m.n_layers {
        m.n_vocab()
    } else {
        Some(1)
    }
}

fn check_deepseek_range(m: &Meta<'_>, start: u32, end: u32) -> Result<(), String> {
    if m.u64("nextn_predict_layers").unwrap_or(0) > 0 {
        return Err(
            "the model carries multi-token-prediction (nextn) layers after its trunk; \
             slicing those is not supported yet"
                .into(),
        );
    }
    let source_lite = is_lite(m.n_layers, m.n_vocab());
    let slice_lite = is_lite(end - start, slice_vocab(m, end));
    let q_lora = m.u64("attention.q_lora_rank").unwrap_or(0);
    if slice_lite && !source_lite && q_lora > 0 {
        return Err(format!(
            "llama.cpp takes a {}-layer DeepSeek-2 for a \"lite\" one and ignores its \
             q_lora_rank ({q_lora}); pick a range of another length",
            end - start
        ));
    }
    Ok(())
}

/// Rewrites a slice's metadata (already cut by the generic recipe) with
/// the family's rules: the sliding-window pattern and DeepSeek-2's keys.
pub(crate) fn rewrite_metadata(
    m: &Meta<'_>,
    start: u32,
    end: u32,
    out: &mut Vec<(String, MetaValue)>,
) -> Result<(), SliceError> {
    let f = family(m.arch)?;
    let key = |rel: &str| format!("{}.{rel}", m.arch);
    let mut set = |k: String, v: MetaValue| match out.iter_mut().find(|(name, _)| *name == k) {
        Some(slot) => slot.1 = v,
        None => out.push((k, v)),
    };
    if let Some(swa) = f.swa {
        if let Some(layers) = m.swa_layers(swa)? {
            let cut = layers
                .get(start as usize..end as usize)
                .map(<[bool]>::to_vec)
                .unwrap_or_default();
            if cut.iter().any(|&s| s) {
                set(key(SWA_PATTERN), MetaValue::Array(MetaArray::Bool(cut)));
            } else {
                // No layer of the slice slides, and llama.cpp aborts on a
                // windowed model without one (`is_swa_any`): turn the
                // window off, which is what these layers compute anyway.
                // (`check_slice_range` refused the families whose window
                // cannot be turned off.)
                set(key(SWA_WINDOW), MetaValue::U32(0));
            }
        }
    }
    if f.deepseek {
        // Leading dense blocks: layer `il` is dense when il < lead.
        if let Some(lead) = m.u64("leading_dense_block_count") {
            let local = lead.saturating_sub(start.into()).min((end - start).into());
            set(
                key("leading_dense_block_count"),
                MetaValue::U32(local as u32),
            );
        }
        // A lite model has no q_lora_rank; a slice that is not "lite" by
        // its length must be told it is 0 (plain attn_q).
        let slice_lite = is_lite(end - start, slice_vocab(m, end));
        if !slice_lite && m.get("attention.q_lora_rank").is_none() {
            set(key("attention.q_lora_rank"), MetaValue::U32(0));
        }
        // Without the key llama.cpp guesses the gating function from the
        // layer count and vocabulary: write the whole model's guess.
        let gating = m.u64("expert_gating_func").unwrap_or(0);
        if gating == 0 {
            let glm_lite = (m.n_layers == 47 || m.n_layers == 48) && m.n_vocab() == Some(154_880);
            set(
                key("expert_gating_func"),
                MetaValue::U32(if glm_lite { 2 } else { 1 }),
            );
        }
    }
    Ok(())
}

/// Whether `rel` (a key after `{arch}.`) holds per-layer values for
/// `arch`'s family.
pub(crate) fn is_per_layer_key(f: &Family, rel: &str) -> bool {
    BASE_PER_LAYER.contains(&rel) || f.per_layer.contains(&rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(arch: &str, n: u32, extra: Vec<(&str, MetaValue)>) -> Vec<(String, MetaValue)> {
        let mut v = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String(arch.into()),
            ),
            (format!("{arch}.block_count"), MetaValue::U32(n)),
        ];
        v.extend(
            extra
                .into_iter()
                .map(|(k, val)| (format!("{arch}.{k}"), val)),
        );
        v
    }

    fn at<'a>(md: &'a [(String, MetaValue)], arch: &'a str, n_layers: u32) -> Meta<'a> {
        Meta {
            metadata: md,
            arch,
            n_layers,
        }
    }

    fn pattern_of(out: &[(String, MetaValue)], arch: &str) -> Option<Vec<bool>> {
        out.iter()
            .find(|(k, _)| *k == format!("{arch}.{SWA_PATTERN}"))
            .and_then(|(_, v)| match v {
                MetaValue::Array(MetaArray::Bool(b)) => Some(b.clone()),
                _ => None,
            })
    }

    #[test]
    fn every_family_is_in_the_table_once() {
        for f in FAMILIES {
            assert_eq!(FAMILIES.iter().filter(|g| g.arch == f.arch).count(), 1);
            assert_eq!(family(f.arch).map(|g| g.arch).ok(), Some(f.arch));
        }
        assert!(family("gpt2").is_err());
    }

    /// Gemma 3's pattern (6) cut at an odd layer keeps each layer's own
    /// flag, not the slice-local index's.
    #[test]
    fn the_window_pattern_is_cut_from_the_whole_model() {
        let md = meta("gemma3", 8, vec![(SWA_WINDOW, MetaValue::U32(8))]);
        let m = at(&md, "gemma3", 8);
        let mut out = Vec::new();
        rewrite_metadata(&m, 3, 8, &mut out).expect("rewrites");
        // Whole model: layers 0-4 slide, 5 is global, 6-7 slide.
        assert_eq!(
            pattern_of(&out, "gemma3"),
            Some(vec![true, true, false, true, true])
        );
        // Without a window Gemma 3 is all global: nothing written.
        let md = meta("gemma3", 8, vec![]);
        let m = at(&md, "gemma3", 8);
        let mut out = Vec::new();
        rewrite_metadata(&m, 3, 8, &mut out).expect("rewrites");
        assert_eq!(pattern_of(&out, "gemma3"), None);
        // gpt-oss always slides on even layers; a model's own array wins.
        let md = meta(
            "gpt-oss",
            4,
            vec![(
                SWA_PATTERN,
                MetaValue::Array(MetaArray::I32(vec![0, 0, 1, 0])),
            )],
        );
        let m = at(&md, "gpt-oss", 4);
        let mut out = Vec::new();
        rewrite_metadata(&m, 1, 4, &mut out).expect("rewrites");
        assert_eq!(pattern_of(&out, "gpt-oss"), Some(vec![false, true, false]));
    }

    /// A slice with no sliding layer: the window is turned off where the
    /// family allows it (OLMo 2), else the range is refused (gpt-oss).
    #[test]
    fn a_slice_without_a_sliding_layer() {
        let md = meta("olmo2", 8, vec![(SWA_WINDOW, MetaValue::U32(8))]);
        let m = at(&md, "olmo2", 8);
        assert!(check_slice_range(&m, 3, 4).is_ok());
        let mut out = Vec::new();
        rewrite_metadata(&m, 3, 4, &mut out).expect("rewrites");
        assert_eq!(pattern_of(&out, "olmo2"), None);
        assert!(out
            .iter()
            .any(|(k, v)| k == "olmo2.attention.sliding_window" && v.as_u32() == Some(0)));
        let md = meta("gpt-oss", 8, vec![]);
        let m = at(&md, "gpt-oss", 8);
        assert!(
            check_slice_range(&m, 3, 4).is_err(),
            "layer 3 alone is global"
        );
        assert!(check_slice_range(&m, 3, 5).is_ok());
    }

    #[test]
    fn deepseek_slices_keep_their_dense_layers_and_gating() {
        let md = meta(
            "deepseek2",
            6,
            vec![
                ("leading_dense_block_count", MetaValue::U32(2)),
                ("attention.q_lora_rank", MetaValue::U32(32)),
            ],
        );
        let m = at(&md, "deepseek2", 6);
        let lead = |out: &[(String, MetaValue)]| {
            out.iter()
                .find(|(k, _)| k == "deepseek2.leading_dense_block_count")
                .and_then(|(_, v)| v.as_u32())
        };
        for (start, end, want) in [(0, 1, 1), (1, 4, 1), (2, 6, 0), (0, 6, 2)] {
            let mut out = Vec::new();
            rewrite_metadata(&m, start, end, &mut out).expect("rewrites");
            assert_eq!(lead(&out), Some(want), "{start}..{end}");
            assert!(out
                .iter()
                .any(|(k, v)| k == "deepseek2.expert_gating_func" && v.as_u32() == Some(1)));
        }
        // A 26-layer slice of a 30-layer non-lite model would load as lite.
        let md = meta(
            "deepseek2",
            30,
            vec![("attention.q_lora_rank", MetaValue::U32(32))],
        );
        let m = at(&md, "deepseek2", 30);
        assert!(check_slice_range(&m, 0, 26).is_err());
        assert!(check_slice_range(&m, 0, 25).is_ok());
    }

    /// The kept rules answer as the full metadata does, the vocabulary
    /// size coming from the token list when there is no key.
    #[test]
    fn range_rules_keep_what_the_checks_read() {
        let mut md = meta(
            "deepseek2",
            30,
            vec![("attention.q_lora_rank", MetaValue::U32(32))],
        );
        md.push((
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(MetaArray::String(vec!["a".into(); 5])),
        ));
        let rules = RangeRules::new(&md, 30).expect("rules");
        assert!(rules.check(0, 26).is_err());
        assert!(rules.check(0, 25).is_ok());
        assert!(rules.check(0, 31).is_err(), "out of range");
        assert!(rules
            .metadata
            .iter()
            .any(|(k, v)| k == "deepseek2.vocab_size" && v.as_u64() == Some(5)));
        assert!(RangeRules::new(&meta("gpt2", 4, vec![]), 4).is_err());
    }

    #[test]
    fn gemma2_splits_are_refused_with_the_reason() {
        let md = meta("gemma2", 8, vec![]);
        let m = at(&md, "gemma2", 8);
        let e = check_slice_range(&m, 0, 4).expect_err("refused");
        assert!(e.to_string().contains("sqrt(n_embd)"), "{e}");
        assert!(
            check_slice_range(&m, 0, 8).is_ok(),
            "the whole model is fine"
        );
    }
}
