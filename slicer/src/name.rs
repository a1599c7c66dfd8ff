//! A model's human name, `base:tag` as Ollama writes them
//! (`smollm2:135m-q4_1`, `gemma-3:270m-q4_k_m`), from its GGUF metadata.
//!
//! The name is a convenience for people and API clients, not an identity:
//! it comes from `general.*` keys, which the model id leaves out (renaming
//! a model does not change its id), so two different models may carry the
//! same name and a peer may announce any name. The id stays the only way
//! to pin a model.

use crate::gguf::value::MetaValue;

/// Longest part of a name (base, size, fine-tune, quantization), bytes:
/// a whole name is at most 4 × 30 + 3 = 123 bytes.
const MAX_PART_LEN: usize = 30;

/// Whether `c` may appear in a part of a model name: ASCII lowercase
/// letters, digits and `.`, `_`, `-`.
fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

/// The name of a model with these metadata entries: its base
/// (`general.basename`, else `general.name`, else the architecture) and a
/// tag of its size label, fine-tune and quantization (`general.size_label`,
/// `general.finetune`, `general.file_type`), each lowercased, with runs of
/// anything but name characters turned into one `-`: `smollm2:135m-q4_1`.
/// Without any tag part the name is the base alone.
pub fn model_name(metadata: &[(String, MetaValue)], arch: &str) -> String {
    let text = |key: &str| {
        metadata.iter().find_map(|(k, v)| match v {
            MetaValue::String(s) if k == key => Some(slug(s)).filter(|s| !s.is_empty()),
            _ => None,
        })
    };
    let base = text("general.basename")
        .or_else(|| text("general.name"))
        .or_else(|| Some(slug(arch)).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "model".to_string());
    let quant = metadata
        .iter()
        .find(|(k, _)| k == "general.file_type")
        .and_then(|(_, v)| v.as_u64())
        .and_then(file_type_name)
        .map(str::to_string);
    let tag: Vec<String> = [text("general.size_label"), text("general.finetune"), quant]
        .into_iter()
        .flatten()
        .collect();
    if tag.is_empty() {
        base
    } else {
        format!("{base}:{}", tag.join("-"))
    }
}

/// `s` lowercased, every run of characters that are not name characters
/// (or are `-`) made one `-`, no `-` at either end, cut to
/// [`MAX_PART_LEN`] bytes.
fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_PART_LEN));
    let mut dash = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        if is_name_char(c) && c != '-' {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
        if out.len() >= MAX_PART_LEN {
            break;
        }
    }
    out.truncate(MAX_PART_LEN);
    out.trim_end_matches('-').to_string()
}

/// llama.cpp's name of a `general.file_type` (`enum llama_ftype`,
/// `llama.h`), lowercased; `None` for a value it does not name.
fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        7 => "q8_0",
        8 => "q5_0",
        9 => "q5_1",
        10 => "q2_k",
        11 => "q3_k_s",
        12 => "q3_k_m",
        13 => "q3_k_l",
        14 => "q4_k_s",
        15 => "q4_k_m",
        16 => "q5_k_s",
        17 => "q5_k_m",
        18 => "q6_k",
        19 => "iq2_xxs",
        20 => "iq2_xs",
        21 => "q2_k_s",
        22 => "iq3_xs",
        23 => "iq3_xxs",
        24 => "iq1_s",
        25 => "iq4_nl",
        26 => "iq3_s",
        27 => "iq3_m",
        28 => "iq2_s",
        29 => "iq2_m",
        30 => "iq4_xs",
        31 => "iq1_m",
        32 => "bf16",
        36 => "tq1_0",
        37 => "tq2_0",
        38 => "mxfp4_moe",
        39 => "nvfp4",
        40 => "q1_0",
        41 => "q2_0",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(k: &str, v: &str) -> (String, MetaValue) {
        (k.to_string(), MetaValue::String(v.to_string()))
    }

    #[test]
    fn names_are_base_and_a_tag_of_size_finetune_and_quantization() {
        let smollm = [
            s("general.name", "Smollm2 135M 8k Lc100K Mix1 Ep2"),
            s("general.basename", "smollm2"),
            s("general.size_label", "135M"),
            ("general.file_type".into(), MetaValue::U32(3)),
        ];
        assert_eq!(model_name(&smollm, "llama"), "smollm2:135m-q4_1");
        let gemma = [
            s("general.name", "Gemma 3 270m"),
            s("general.basename", "gemma-3"),
            s("general.size_label", "270M"),
            s("general.finetune", "IT"),
            ("general.file_type".into(), MetaValue::U32(15)),
        ];
        assert_eq!(model_name(&gemma, "gemma3"), "gemma-3:270m-it-q4_k_m");
        // No basename: the name; nothing: the architecture alone.
        let named = [s("general.name", "My Model (v2)!")];
        assert_eq!(model_name(&named, "llama"), "my-model-v2");
        assert_eq!(model_name(&[], "qwen2"), "qwen2");
        // A file type llama.cpp does not name is left out.
        let odd = [("general.file_type".into(), MetaValue::U32(999))];
        assert_eq!(model_name(&odd, "llama"), "llama");
    }

    #[test]
    fn hostile_metadata_gives_a_short_valid_name() {
        let long = "Ä".repeat(500) + &"x".repeat(500);
        let meta = [
            s("general.basename", &long),
            s("general.size_label", ":::\n\u{202e}"),
            s("general.finetune", &"y-".repeat(300)),
            ("general.file_type".into(), MetaValue::String("q4".into())),
        ];
        let name = model_name(&meta, "llama");
        assert_eq!(
            name,
            format!("{}:y-y-y-y-y-y-y-y-y-y-y-y-y-y-y", "x".repeat(30))
        );
        assert!(name.len() <= 123);
        // A base of nothing but symbols falls back to the architecture.
        assert_eq!(
            model_name(&[s("general.basename", "!!!")], "llama"),
            "llama"
        );
        assert_eq!(model_name(&[s("general.basename", "!!!")], "???"), "model");
    }
}
