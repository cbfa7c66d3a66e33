//! Text normalisation: the identity used for dedup of prompts and responses.

use crate::config::Dedup;
use unicode_normalization::UnicodeNormalization;

/// The `<image>` placeholder of LLaVA-style prompts (and of TRL image blocks, see
/// [`crate::layout::common::content_text`]).
pub const IMAGE_MARKER: &str = "<image>";

/// The prompt that is stored and where its images sit: every `<image>` placeholder removed (no
/// substitute: the trainer puts the image back at that point), the result trimmed, and the
/// offset of each placeholder in the trimmed prompt, in Unicode scalar values (characters, so
/// Python's `prompt[:offset]` is the text before the image). Placeholders in the whitespace at
/// either end land at 0 / at the end.
pub fn place_images(s: &str) -> (String, Vec<usize>) {
    let (prompt, at) = place_markers(s, &[IMAGE_MARKER]);
    (prompt, at.into_iter().map(|(_, o)| o).collect())
}

/// [`place_images`] for several kinds of placeholder at once (`<image>` and `<video>`): every one
/// removed, and for each, in the order they stand, which marker it was (its index in `markers`)
/// and its char offset in the trimmed prompt.
pub fn place_markers(s: &str, markers: &[&str]) -> (String, Vec<(usize, usize)>) {
    if !markers.iter().any(|m| s.contains(m)) {
        return (s.trim().to_string(), vec![]);
    }
    let mut out = String::with_capacity(s.len());
    let mut at = Vec::new(); // (marker, char offset into `out` before trimming)
    let mut chars = 0usize;
    let mut rest = s;
    loop {
        let next = markers.iter().enumerate().filter_map(|(k, m)| rest.find(m).map(|i| (i, k, m.len()))).min();
        let Some((i, k, len)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..i]);
        chars += rest[..i].chars().count();
        at.push((k, chars));
        rest = &rest[i + len..];
    }
    let lead = out.chars().take_while(|c| c.is_whitespace()).count();
    let trimmed = out.trim().to_string();
    let len = trimmed.chars().count();
    (trimmed, at.into_iter().map(|(k, o)| (k, o.saturating_sub(lead).min(len))).collect())
}

/// The prompt as [`collapse`] and [`normalize`] saw it before placeholders had positions: the
/// stored prompt with a space at each image offset. Its key equals that of the prompt as written
/// (a placeholder counts as a space), so dedup keys do not depend on where images sit.
pub fn with_spaces_at(prompt: &str, offsets: &[usize]) -> String {
    if offsets.is_empty() {
        return prompt.to_string();
    }
    debug_assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "offsets are sorted");
    let mut out = String::with_capacity(prompt.len() + offsets.len());
    let mut next = offsets.iter().peekable();
    for (i, c) in prompt.chars().enumerate() {
        while next.peek().is_some_and(|&&o| o == i) {
            out.push(' ');
            next.next();
        }
        out.push(c);
    }
    for _ in next {
        out.push(' ');
    }
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
    }

    #[test]
    fn images_are_placed_at_char_offsets() {
        assert_eq!(place_images("<image>\nWhat colour?"), ("What colour?".into(), vec![0]));
        assert_eq!(place_images("  What colour? "), ("What colour?".into(), vec![]));
        // Middle placeholders keep the text around them as written; offsets count chars, not bytes.
        let (p, at) = place_images("Compare <image> with <image>: which is older?");
        assert_eq!((p.as_str(), at.clone()), ("Compare  with : which is older?", vec![8, 14]));
        let (p, at) = place_images("Ünïcode <image>é<image>");
        assert_eq!((p.as_str(), at.clone()), ("Ünïcode é", vec![8, 9]));
        let chars: Vec<char> = p.chars().collect();
        assert_eq!(chars[..8].iter().collect::<String>(), "Ünïcode ");
        assert_eq!(place_images(" <image>\n<image>\nQ <image> "), ("Q".into(), vec![0, 0, 1]));
        // The dedup key is that of the prompt as written.
        for raw in ["Compare <image> with <image>: which?", "is<image>this", "<image>\nQ", "Q\n<image>", "<image>Q<image>"] {
            let (p, at) = place_images(raw);
            assert_eq!(collapse(&with_spaces_at(&p, &at)), collapse(raw), "{raw:?}");
            assert_eq!(normalize(&with_spaces_at(&p, &at)), normalize(raw), "{raw:?}");
        }
    }

    #[test]
    fn images_and_videos_are_placed_together() {
        let (p, at) = place_markers("<video>\nWhat happens after <image>?", &[IMAGE_MARKER, "<video>"]);
        assert_eq!((p.as_str(), at), ("What happens after ?", vec![(1, 0), (0, 19)]));
        let (p, at) = place_markers("Q <video>", &[IMAGE_MARKER]);
        assert_eq!((p.as_str(), at), ("Q <video>", vec![]));
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
