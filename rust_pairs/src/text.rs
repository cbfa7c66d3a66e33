//! Text normalisation: the identity used for dedup of prompts and responses.

use crate::config::Dedup;
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

/// The exact prompt identity: `<image>` placeholders removed, whitespace runs collapsed to one
/// space, trimmed; case and Unicode form kept.
pub fn collapse(s: &str) -> String {
    s.replace("<image>", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// End-of-sequence markers that generation leaves at an answer's end.
pub const EOS_MARKERS: [&str; 5] = ["</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<eos>"];

/// Prompt identity under a dedup mode.
pub fn prompt_key(s: &str, mode: Dedup) -> String {
    match mode {
        Dedup::Normalized => normalize(s),
        Dedup::Exact | Dedup::Eos => collapse(s),
    }
}

/// Response identity under a dedup mode.
pub fn response_key(s: &str, mode: Dedup) -> String {
    match mode {
        Dedup::Normalized => normalize(s),
        Dedup::Exact => s.trim().to_string(),
        Dedup::Eos => {
            let mut t = s.trim();
            while let Some(m) = EOS_MARKERS.iter().find(|m| t.ends_with(*m)) {
                t = t[..t.len() - m.len()].trim_end();
            }
            t.to_string()
        }
    }
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

    #[test]
    fn dedup_keys_by_mode() {
        assert_eq!(prompt_key("<image>\n What  IS\tit? ", Dedup::Exact), "What IS it?");
        assert_ne!(prompt_key("What is it?", Dedup::Exact), prompt_key("what is it?", Dedup::Exact));
        assert_eq!(prompt_key("What is it?", Dedup::Normalized), prompt_key("what is it?", Dedup::Normalized));
        assert_eq!(response_key(" Yes. \n", Dedup::Exact), "Yes.");
        assert_ne!(response_key("Yes.", Dedup::Exact), response_key("yes.", Dedup::Exact));
        assert_ne!(response_key("Yes.", Dedup::Exact), response_key("Yes.</s>", Dedup::Exact));
        assert_eq!(response_key("Yes.</s>", Dedup::Eos), "Yes.");
        assert_eq!(response_key(" Yes. </s>\n<|im_end|>", Dedup::Eos), "Yes.");
        assert_ne!(response_key("Yes.", Dedup::Eos), response_key("yes.", Dedup::Eos));
    }
}
