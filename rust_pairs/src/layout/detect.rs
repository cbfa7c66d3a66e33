//! Layout detection from one record's keys (a file's layout is that of its first record that says).

use crate::config::Format;
use serde_json::Value;

/// Guess the format of one record from its keys.
pub fn detect(v: &Value) -> Option<Format> {
    let o = v.as_object()?;
    if o.contains_key("completions") {
        Some(Format::Vlfeedback)
    } else if o.contains_key("responses") {
        Some(Format::Rated)
    } else if o.contains_key("chosen") || o.contains_key("rejected") || o.contains_key("reject") || o.contains_key("text") {
        Some(Format::Pairwise)
    } else {
        None
    }
}
