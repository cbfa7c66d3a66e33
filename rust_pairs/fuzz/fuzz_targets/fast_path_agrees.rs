//! The VLFeedback fast path and the `Value` path agree on every input: where the fast path
//! answers, the `Value` path parses the same draft with no rejects (issue 13).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rust_pairs::config::VLFEEDBACK_ASPECTS;
use rust_pairs::layout::{fast_path_agrees, Ctx};
use rust_pairs::record::Source;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let src = Source::line("fuzz", 1);
    let aspects: Vec<(String, f64)> = VLFEEDBACK_ASPECTS.iter().map(|a| (a.to_string(), 1.0)).collect();
    let ctx = Ctx::plain(&src, &aspects, 100_000);
    if let Err(e) = fast_path_agrees(text, &ctx) {
        panic!("{e}");
    }
});
