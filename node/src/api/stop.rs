//! Stop strings, matched on the asker as the text streams in: the text
//! ends right before the first stop string, wherever the pieces split it.

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Longest stop string, bytes (what is held back is bounded by it).
pub const MAX_STOP_BYTES: usize = 256;

/// Finds the first stop string in a text that arrives piece by piece,
/// holding back only the tail that could still begin one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text seen but not released yet.
    held: String,
    /// A stop string was found: nothing more is released.
    stopped: bool,
}

/// What one piece gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// Text that is safe to send (no stop string can start in it).
    Text(String),
    /// A stop string was found: the text before it, then the end.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..StopMatcher::default()
        }
    }

    /// Adds a piece of text.
    pub fn push(&mut self, piece: &str) -> Matched {
        if self.stopped {
            return Matched::Stop(String::new());
        }
        if self.stops.is_empty() {
            return Matched::Text(piece.to_string());
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let mut out = std::mem::take(&mut self.held);
            out.truncate(at);
            return Matched::Stop(out);
        }
        // Hold back the longest tail that is a prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let rest = self.held.split_off(cut);
        Matched::Text(std::mem::replace(&mut self.held, rest))
    }

    /// The end of the text: whatever was held back (no stop string came).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

/// Bytes of the longest suffix of `text` that is a proper prefix of
/// `stop`, on character boundaries.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start)
                && stop.is_char_boundary(n)
                && stop.as_bytes()[..n] == text.as_bytes()[start..]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                Matched::Text(t) => out.push_str(&t),
                Matched::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_pieces_ends_the_text_before_it() {
        assert_eq!(
            run(&["\n\n"], &["Paris", " is\n", "\nthe"]),
            ("Paris is".into(), true)
        );
        assert_eq!(
            run(&["END", "x"], &["abcE", "N", "D tail"]),
            ("abc".into(), true)
        );
        // The earliest of several stops wins.
        assert_eq!(run(&["c", "b"], &["abc"]), ("a".into(), true));
    }

    #[test]
    fn text_without_a_stop_comes_out_whole_and_held_text_is_released() {
        assert_eq!(
            run(&["STOP"], &["ST", "OR", "Y S", "TO"]),
            ("STORY STO".into(), false)
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "é!x"]), ("café".into(), true));
        assert_eq!(
            run(&["日本"], &["今日", "は日"]),
            ("今日は日".into(), false)
        );
        assert_eq!(
            run(&["日本"], &["今日は日", "本語"]),
            ("今日は".into(), true)
        );
    }
}
