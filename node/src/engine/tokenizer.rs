//! Tokenizing and detokenizing with llama.cpp's own vocabulary code, through
//! the safe `llama-cpp-2` API (vocab-only load: no weights are read).

use std::path::Path;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::{backend, EngineError};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What it says.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's vocabulary, special tokens and chat template.
pub struct Tokenizer {
    model: LlamaModel,
    /// The vocabulary's end-of-generation tokens, ascending (found once,
    /// at load: a chain's ring names them in every `Open`).
    eog: Vec<i32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.model.n_vocab())
            .finish()
    }
}

impl Tokenizer {
    /// Loads only the vocabulary of a GGUF (a whole model or a last slice).
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let backend = backend()
            .as_ref()
            .ok_or_else(|| EngineError::Tokenizer("llama.cpp backend not initialised".into()))?;
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        if model.n_vocab() <= 1 {
            return Err(EngineError::Tokenizer(format!(
                "{} has no vocabulary (a non-last slice?)",
                path.display()
            )));
        }
        let eog = (0..model.n_vocab())
            .filter(|&t| model.vocab().is_eog(LlamaToken(t)))
            .collect();
        Ok(Self { model, eog })
    }

    /// Tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        usize::try_from(self.model.n_vocab()).unwrap_or(0)
    }

    /// Tokenizes like llama.cpp's completion tools: BOS if the vocab asks
    /// for it, special tokens parsed.
    pub fn tokenize(&self, text: &str) -> Vec<i32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), true, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Wraps one user message in the model's chat template, ready for the
    /// assistant's reply.
    pub fn chat_prompt(&self, user: &str) -> Result<String, EngineError> {
        self.chat_messages(&[ChatMessage::new("user", user)])
    }

    /// Wraps a conversation in the model's chat template (llama.cpp's
    /// built-in copy of it), ready for the assistant's reply.
    pub fn chat_messages(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let tmpl = self
            .model
            .chat_template(None)
            .map_err(|e| EngineError::Tokenizer(format!("no chat template: {e} (use --raw)")))?;
        let msgs = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Tokenizer(format!("a chat message: {e}")))?;
        self.model
            .apply_chat_template(&tmpl, &msgs, true)
            .map_err(|e| EngineError::Tokenizer(format!("chat template: {e}")))
    }

    /// The bytes of one token as text (special tokens not rendered).
    pub fn piece(&self, token: i32) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }

    /// End of generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    /// Every end-of-generation token of the vocabulary (a few), ascending.
    pub fn eog_tokens(&self) -> &[i32] {
        &self.eog
    }

    /// Context length the model was trained with, in tokens (from the
    /// GGUF metadata).
    pub fn n_ctx_train(&self) -> u32 {
        self.model.n_ctx_train()
    }
}

/// Turns a stream of token pieces into valid UTF-8 text, holding back an
/// incomplete multi-byte character until its last byte arrives.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // An invalid sequence: emit it lossily, it will never become valid.
                Some(_) => self.pending.len(),
                // An incomplete tail: keep it for the next piece.
                None => e.valid_up_to(),
            },
        };
        let rest = self.pending.split_off(valid);
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        out
    }

    /// Whatever is left at the end (lossily).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn utf8_stream_holds_partial_chars() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(s.push(&[0xe2, 0x82]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
