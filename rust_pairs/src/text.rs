//! Text normalisation: the identity used for dedup of prompts and responses.

use unicode_normalization::UnicodeNormalization;

/// Remove `<image>` placeholders (LLaVA-style prompts) and trim; this is the prompt that is stored.
pub fn clean_prompt(s: &str) -> String {
    let mut out = s.replace("<image>", " ");
    // Collapse only what the placeholder removal left at the edges; inner formatting is kept.
    out = out.trim().to_string();
    out
}

/// NFKC, lowercase, whitespace runs collapsed to one space, trimmed; `<image>` placeholders dropped.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    let cleaned: std::borrow::Cow<str> = if s.contains("<image>") { s.replace("<image>", " ").into() } else { s.into() };
    // ASCII text is already in NFKC; skip the Unicode tables for it.
    let chars: Box<dyn Iterator<Item = char>> =
        if cleaned.is_ascii() { Box::new(cleaned.chars()) } else { Box::new(cleaned.nfkc()) };
    for c in chars.flat_map(char::to_lowercase) {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_collapses_case_space_and_width() {
        assert_eq!(normalize("  What  is\n\tTHIS? "), "what is this?");
        assert_eq!(normalize("<image>\nDescribe it"), "describe it");
        // NFKC folds full-width letters.
        assert_eq!(normalize("ＡＢＣ"), "abc");
        assert_eq!(normalize(""), "");
        assert_eq!(clean_prompt("<image>\nWhat colour?"), "What colour?");
    }
}
