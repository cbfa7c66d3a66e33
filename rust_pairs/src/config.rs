//! Build options. Every check names the flag it is about, so the CLI error reads as advice.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Input layout; `Auto` detects it per file from its first records (see [`crate::layout::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Auto,
    /// VLFeedback rows (Silkie); without `img_path` the image is `merged_images/{id}.jpg`.
    Vlfeedback,
    /// HelpSteer-style rated rows.
    Rated,
    /// `{image, question, chosen, rejected}`: RLAIF-V, RLHF-V (`text`), SPA-VL, SeVa (`reject`, `image_id`).
    Pairwise,
    /// TRL's vision format: `images` + `prompt`/`chosen`/`rejected` as lists of `{role, content}` messages.
    Trl,
    /// MM-DPO's DPO file: `{from, value}` turns (or their Python `str()`), shipped reference log-probs.
    Mmdpo,
    /// POVID: `conversations` (chosen) + `rejected_conversations`.
    Povid,
    /// LLaVA-RLHF human preference: `conversations`, `output_1`, `output_2`, `preference`.
    LlavaRlhf,
    /// ms-swift's RLHF rows: `messages` (user turn, chosen assistant turn), `rejected_response`
    /// (or `rejected_messages`), `images`, `videos`.
    MsSwift,
    /// Any row through `--field NAME=PATH` declarations.
    Mapped,
}

impl Format {
    pub const ALL: [Format; 10] = [
        Format::Auto,
        Format::Vlfeedback,
        Format::Rated,
        Format::Pairwise,
        Format::Trl,
        Format::Mmdpo,
        Format::Povid,
        Format::LlavaRlhf,
        Format::MsSwift,
        Format::Mapped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Vlfeedback => "vlfeedback",
            Format::Rated => "rated",
            Format::Pairwise => "pairwise",
            Format::Trl => "trl",
            Format::Mmdpo => "mmdpo",
            Format::Povid => "povid",
            Format::LlavaRlhf => "llava-rlhf",
            Format::MsSwift => "ms-swift",
            Format::Mapped => "mapped",
        }
    }
}

/// The fields `--field NAME=PATH` may map.
pub const FIELD_NAMES: [&str; 6] = ["prompt", "image", "video", "chosen", "rejected", "id"];

/// Check `--field` declarations (`("prompt", "question")`, `("chosen", "answers.good")`).
pub fn check_fields(fields: &[(String, String)]) -> Result<()> {
    for (i, (name, path)) in fields.iter().enumerate() {
        if !FIELD_NAMES.contains(&name.as_str()) {
            return Err(Error::Config(format!("--field: unknown name {name:?}; choose one of {}", FIELD_NAMES.join(", "))));
        }
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(Error::Config(format!("--field {name}: {path:?} is not a dotted path (like question or answers.good)")));
        }
        if fields[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::Config(format!("--field: {name} is declared twice")));
        }
    }
    Ok(())
}

/// What makes two prompts, or two responses, the same when records are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    /// Exact duplicates only: prompts equal after whitespace collapse and `<image>` removal,
    /// responses equal after trimming surrounding whitespace (case and Unicode form kept).
    Exact,
    /// Also case-folded and NFKC-normalised ("Yes." and "yes." collapse).
    Normalized,
    /// Exact, and end-of-sequence markers (`</s>`, `<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`)
    /// at a response's end ignored (SeVa drops a pair whose answers differ only by these).
    Eos,
}

/// A named seed recipe: the pair construction of a published paper, as its code does it.
pub struct Recipe {
    pub name: &'static str,
    pub strategy: &'static str,
    pub aspects: &'static [&'static str],
    pub score: Score,
    pub min_margin: Option<f64>,
    pub dedup: Dedup,
    pub help: &'static str,
}

pub static RECIPES: &[Recipe] = &[
    Recipe {
        name: "silkie",
        strategy: "all-pairs",
        aspects: &VLFEEDBACK_ASPECTS,
        score: Score::Mean,
        min_margin: None,
        dedup: Dedup::Exact,
        help: "Silkie (vlf-silkie/VLFeedback): mean of the three VLFeedback aspects, every pair, ties and non-numeric ratings skipped",
    },
    Recipe {
        name: "mmdpo",
        strategy: "best-vs-random",
        aspects: &["helpfulness", "correctness", "coherence"],
        score: Score::Sum,
        min_margin: Some(2.0),
        dedup: Dedup::Exact,
        help: "MM-DPO (findalexli/mllm-dpo notebooks): sum of helpfulness+correctness+coherence, the top response against one random response at least 2 lower",
    },
    Recipe {
        name: "mmdpo-self",
        strategy: "best-vs-worst",
        aspects: &["helpfulness", "correctness", "coherence"],
        score: Score::Sum,
        min_margin: Some(2.0),
        dedup: Dedup::Exact,
        help: "MM-DPO self-sampled: sum of helpfulness+correctness+coherence, max against min when they differ by at least 2",
    },
    Recipe {
        name: "seva",
        strategy: "all-pairs",
        aspects: &[],
        score: Score::Mean,
        min_margin: None,
        dedup: Dedup::Eos,
        help: "SeVa (Kevinz-code/SeVa step 3): pairs kept as given; a pair is dropped only when its answers are identical after stripping whitespace and </s> (case-sensitive)",
    },
];

pub fn recipe(name: &str) -> Option<&'static Recipe> {
    RECIPES.iter().find(|r| r.name == name)
}

/// How a response's aspect ratings combine into the score that margins and selection use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// Weighted mean (Silkie).
    Mean,
    /// Weighted sum (MM-DPO: helpfulness + correctness + coherence).
    Sum,
}

/// How images are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageCheck {
    /// Container structure: JPEG markers through a frame header and scan data to the end-of-image
    /// marker; every PNG chunk's CRC, IHDR, IDAT and IEND; GIF trailer; RIFF/BMP sizes. Catches
    /// truncated and corrupted files at a fraction of a decode's cost.
    Structure,
    /// A full pixel decode.
    Decode,
    /// The header only (dimensions).
    Header,
}

/// The three VLFeedback aspects rated by GPT-4V (Silkie, arXiv 2312.10665).
pub const VLFEEDBACK_ASPECTS: [&str; 3] = ["Helpfulness", "Visual Faithfulness", "Ethical Considerations"];
/// The five HelpSteer aspects (MM-DPO, arXiv 2402.10884).
pub const HELPSTEER_ASPECTS: [&str; 5] = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"];

/// The scale ratings must lie on; a rating outside it rejects its response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatingScale {
    pub lo: f64,
    pub hi: f64,
    /// Where the scale comes from, for the reject reason.
    pub origin: &'static str,
}

/// No rating scale is wider: keeps weighted sums and margins finite when no scale is known.
pub const MAX_ABS_RATING: f64 = 1e15;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildConfig {
    pub inputs: Vec<String>,
    pub image_root: Option<String>,
    pub out: String,
    pub format: Format,
    pub strategy: String,
    /// Minimum weighted-mean-score margin; `None` takes the strategy's default.
    pub min_margin: Option<f64>,
    pub min_probability: f64,
    /// Declared aspects and weights; `None` takes the format's default aspects with weight 1.
    pub aspects: Option<Vec<(String, f64)>>,
    /// Declared rating scale `[lo, hi]`; `None` takes the format's known scale (VLFeedback 1-5,
    /// HelpSteer 0-4 for rated rows with the default aspects), else only `|rating| <= 1e15`.
    pub rating_range: Option<(f64, f64)>,
    pub val_fraction: f64,
    pub seed: u64,
    pub max_samples_per_shard: u64,
    pub max_shard_bytes: u64,
    /// (index, count) of this partition.
    pub partition: (u64, u64),
    /// MinHash Jaccard threshold for merging near-duplicate prompts on the same image; `None` = off.
    pub near_dup_threshold: Option<f64>,
    /// Strength of the Gaussian prior on Bradley-Terry log-strengths (L2 penalty alpha).
    pub bt_prior: f64,
    pub max_text_chars: usize,
    /// Responses per record, and per group after duplicates are pooled; more are rejected
    /// (ranking and all-pairs selection are quadratic in this).
    pub max_responses: usize,
    pub max_record_bytes: usize,
    pub image_check: ImageCheck,
    /// Images with more pixels (width x height, read from the header before any decode) are
    /// rejected in every check mode; Pillow's `MAX_IMAGE_PIXELS` default.
    pub max_image_pixels: u64,
    /// Videos larger than this (a container file's size from `fstat`, before it is read; a frame
    /// sequence's frames together) are rejected; 2 GiB by default.
    pub max_video_bytes: u64,
    /// Memory budget of one spill bucket: at most this many bytes of spilled records and one
    /// record per 2 KiB of it (see [`crate::spill`]); bounds memory whatever the input.
    pub spill_bucket_bytes: u64,
    pub threads: Option<usize>,
    /// Threads that validate records (each reads an image file): more than cores, to keep many
    /// small reads in flight.
    pub io_threads: usize,
    /// fsync every shard before it is renamed into place (power-loss durability; slower).
    pub fsync: bool,
    pub progress: bool,
    /// `--field NAME=PATH`: where a row keeps prompt, image, video, chosen, rejected, id.
    pub fields: Vec<(String, String)>,
    /// `--image-template`: the image path built from the row's fields, e.g. `merged_images/{id}.jpg`.
    pub image_template: Option<String>,
    /// `None`: the recipe's, else exact.
    pub dedup: Option<Dedup>,
    /// `None`: the recipe's, else mean.
    pub score: Option<Score>,
    /// A named seed recipe (see [`RECIPES`]); it sets strategy, aspects, score and margin.
    pub recipe: Option<String>,
    /// Responses of these models may be rejected but never chosen (MM-DPO's gold answer).
    pub exclude_chosen_models: Vec<String>,
    /// Which model the reference log-probs a dataset ships were computed with (recorded in the samples).
    pub ref_logp_model: Option<String>,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            inputs: vec![],
            image_root: None,
            out: String::new(),
            format: Format::Auto,
            strategy: "all-pairs".into(),
            min_margin: None,
            min_probability: 0.75,
            aspects: None,
            rating_range: None,
            val_fraction: 0.05,
            seed: 0,
            max_samples_per_shard: 1000,
            max_shard_bytes: 1 << 30,
            partition: (0, 1),
            near_dup_threshold: None,
            bt_prior: 0.1,
            max_text_chars: 100_000,
            max_responses: 256,
            max_record_bytes: 64 << 20,
            image_check: ImageCheck::Structure,
            max_image_pixels: 89_478_485,
            max_video_bytes: crate::video::DEFAULT_MAX_VIDEO_BYTES,
            spill_bucket_bytes: 64 << 20,
            threads: None,
            io_threads: 16,
            fsync: false,
            progress: false,
            fields: vec![],
            image_template: None,
            dedup: None,
            score: None,
            recipe: None,
            exclude_chosen_models: vec![],
            ref_logp_model: None,
        }
    }
}

/// Parse `"Helpfulness=1,Visual Faithfulness=0.5"` (weight defaults to 1 when `=w` is left out).
pub fn parse_aspects(spec: &str) -> Result<Vec<(String, f64)>> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = match part.rsplit_once('=') {
            Some((n, w)) => {
                let w: f64 = w.trim().parse().map_err(|_| {
                    Error::Config(format!("--aspects: weight {w:?} of aspect {n:?} is not a number"))
                })?;
                (n.trim().to_string(), w)
            }
            None => (part.to_string(), 1.0),
        };
        if name.is_empty() {
            return Err(Error::Config(format!("--aspects: empty aspect name in {spec:?}")));
        }
        if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            return Err(Error::Config(format!("--aspects: aspect {name:?} is declared twice")));
        }
        out.push((name, weight));
    }
    if out.is_empty() {
        return Err(Error::Config("--aspects: no aspect declared".into()));
    }
    Ok(out)
}

impl BuildConfig {
    /// The options with `--recipe` applied: it sets strategy, aspects, score, margin and dedup
    /// unless the flag is given; a flag that contradicts the recipe's strategy is an error.
    pub fn effective(&self) -> Result<BuildConfig> {
        let mut c = self.clone();
        if let Some(name) = &self.recipe {
            let Some(r) = recipe(name) else {
                let names: Vec<&str> = RECIPES.iter().map(|r| r.name).collect();
                return Err(Error::Config(format!("--recipe: unknown recipe {name:?}; choose one of {}", names.join(", "))));
            };
            if c.strategy != "all-pairs" && c.strategy != r.strategy {
                return Err(Error::Config(format!(
                    "--recipe {name} selects pairs by {}; drop --strategy {} (or drop --recipe)",
                    r.strategy, c.strategy
                )));
            }
            c.strategy = r.strategy.to_string();
            if c.aspects.is_none() && !r.aspects.is_empty() {
                c.aspects = Some(r.aspects.iter().map(|a| (a.to_string(), 1.0)).collect());
            }
            c.score = c.score.or(Some(r.score));
            c.min_margin = c.min_margin.or(r.min_margin);
            c.dedup = c.dedup.or(Some(r.dedup));
        }
        c.dedup = c.dedup.or(Some(Dedup::Exact));
        c.score = c.score.or(Some(Score::Mean));
        if !c.fields.is_empty() && c.format == Format::Auto {
            c.format = Format::Mapped;
        }
        Ok(c)
    }

    pub fn dedup_mode(&self) -> Dedup {
        self.dedup.unwrap_or(Dedup::Exact)
    }

    pub fn score_mode(&self) -> Score {
        self.score.unwrap_or(Score::Mean)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        check_fields(&self.fields)?;
        if self.format == Format::Mapped {
            for need in ["prompt", "chosen", "rejected"] {
                if !self.fields.iter().any(|(n, _)| n == need) {
                    return bad(format!("--field {need}=PATH is required by the mapped layout (declare prompt, chosen and rejected)"));
                }
            }
        } else if !self.fields.is_empty() {
            return bad(format!("--field declares a mapping, which only --format mapped (or auto) reads; got --format {}", self.format.name()));
        }
        if let Some(t) = &self.image_template {
            crate::layout::common::check_template(t).map_err(|e| Error::Config(format!("--image-template: {e}")))?;
        }
        if self.inputs.is_empty() {
            return bad("INPUT: give at least one JSONL file".into());
        }
        if self.out.is_empty() {
            return bad("--out: an output directory is required".into());
        }
        if crate::select::strategy(&self.strategy).is_none() {
            return bad(format!(
                "--strategy: unknown strategy {:?}; choose one of {}",
                self.strategy,
                crate::select::strategy_names().join(", ")
            ));
        }
        if let Some(m) = self.min_margin {
            if !(m.is_finite() && m >= 0.0) {
                return bad(format!("--min-margin must be a finite number >= 0, got {m}"));
            }
        }
        if !(self.min_probability > 0.0 && self.min_probability < 1.0) {
            return bad(format!("--min-probability must be in (0, 1), got {}", self.min_probability));
        }
        if let Some(aspects) = &self.aspects {
            if aspects.is_empty() {
                return bad("--aspects: no aspect declared".into());
            }
            for (n, w) in aspects {
                if !(w.is_finite() && *w >= 0.0 && *w <= MAX_ABS_RATING) {
                    return bad(format!("--aspects: weight of {n:?} must be in [0, 1e15], got {w}"));
                }
            }
            if aspects.iter().all(|(_, w)| *w == 0.0) {
                return bad("--aspects: at least one weight must be > 0".into());
            }
        }
        if let Some((lo, hi)) = self.rating_range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi && lo.abs() <= MAX_ABS_RATING && hi.abs() <= MAX_ABS_RATING) {
                return bad(format!("--rating-range must be LO:HI with finite LO < HI within ±1e15, got {lo}:{hi}"));
            }
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad(format!("--val-fraction must be in [0, 1), got {}", self.val_fraction));
        }
        if self.max_samples_per_shard == 0 {
            return bad("--max-samples-per-shard must be >= 1".into());
        }
        if self.max_shard_bytes < 10 * 1024 {
            return bad(format!("--max-shard-bytes must be at least 10240, got {}", self.max_shard_bytes));
        }
        let (i, n) = self.partition;
        if n == 0 || i >= n {
            return bad(format!("--partition must be i/N with 0 <= i < N, got {i}/{n}"));
        }
        if let Some(t) = self.near_dup_threshold {
            if !(t > 0.0 && t <= 1.0) {
                return bad(format!("--near-dup must be a Jaccard threshold in (0, 1], got {t}"));
            }
        }
        if !(self.bt_prior.is_finite() && self.bt_prior > 0.0) {
            return bad(format!(
                "--bt-prior must be > 0 (without a prior a strict ranking has no finite Bradley-Terry fit), got {}",
                self.bt_prior
            ));
        }
        if self.max_image_pixels == 0 {
            return bad("--max-image-pixels must be >= 1".into());
        }
        if !(1..=crate::video::MAX_VIDEO_BYTES_LIMIT).contains(&self.max_video_bytes) {
            return bad(format!(
                "--max-video-bytes must be in 1..={} (a tar member holds less than 8 GiB), got {}",
                crate::video::MAX_VIDEO_BYTES_LIMIT,
                self.max_video_bytes
            ));
        }
        if !(2..=65_536).contains(&self.max_responses) {
            return bad(format!("--max-responses must be in 2..=65536, got {}", self.max_responses));
        }
        if self.max_text_chars == 0 {
            return bad("--max-text-chars must be >= 1".into());
        }
        if self.io_threads == 0 || self.io_threads > 1024 {
            return bad(format!("--io-threads must be in 1..=1024, got {}", self.io_threads));
        }
        if self.spill_bucket_bytes < 1024 {
            return bad("--spill-bucket-bytes must be >= 1024".into());
        }
        Ok(())
    }

    /// Aspects in force for a file of the given (detected) format.
    pub fn aspects_for(&self, format: Format) -> Vec<(String, f64)> {
        if let Some(a) = &self.aspects {
            return a.clone();
        }
        let names: &[&str] = match format {
            Format::Vlfeedback => &VLFEEDBACK_ASPECTS,
            Format::Rated => &HELPSTEER_ASPECTS,
            _ => &[],
        };
        names.iter().map(|n| (n.to_string(), 1.0)).collect()
    }

    /// Rating scale in force for a file of the given (detected) format: `--rating-range`, else the published
    /// scale of the aspects rated (VLFeedback's three: 1-5; HelpSteer's, all or some: 0-4, in any layout), else
    /// none (other aspects, e.g. `vpa judge`'s Verified 0/1 or Claims 0, -1, ...: only `|rating| <= 1e15`).
    pub fn rating_scale_for(&self, format: Format) -> Option<RatingScale> {
        if let Some((lo, hi)) = self.rating_range {
            return Some(RatingScale { lo, hi, origin: "--rating-range" });
        }
        let aspects = self.aspects_for(format);
        let within = |known: &[&str]| {
            !aspects.is_empty() && aspects.iter().all(|(n, _)| known.iter().any(|k| k.eq_ignore_ascii_case(n)))
        };
        if within(&VLFEEDBACK_ASPECTS) {
            Some(RatingScale { lo: 1.0, hi: 5.0, origin: "VLFeedback's scale" })
        } else if within(&HELPSTEER_ASPECTS) {
            Some(RatingScale { lo: 0.0, hi: 4.0, origin: "HelpSteer's scale" })
        } else {
            None
        }
    }

    /// Partition file suffix: empty for a single build, `-p{i}of{N}` otherwise.
    pub fn partition_suffix(&self) -> String {
        let (i, n) = self.partition;
        if n == 1 {
            String::new()
        } else {
            format!("-p{i:04}of{n:04}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspects_parse_with_and_without_weights() {
        let a = parse_aspects("Helpfulness=1, Visual Faithfulness=0.5,Ethics").unwrap();
        assert_eq!(a, vec![("Helpfulness".into(), 1.0), ("Visual Faithfulness".into(), 0.5), ("Ethics".into(), 1.0)]);
        assert!(parse_aspects("a=x").unwrap_err().to_string().contains("--aspects"));
        assert!(parse_aspects("a,A").is_err());
        assert!(parse_aspects(" , ").is_err());
    }

    #[test]
    fn the_rating_scale_follows_the_aspects_rated() {
        let base = BuildConfig { inputs: vec!["x".into()], out: "o".into(), ..Default::default() };
        let with = |names: &[&str]| BuildConfig { aspects: Some(names.iter().map(|n| (n.to_string(), 1.0)).collect()), ..base.clone() };
        let scale = |c: &BuildConfig, f: Format| c.rating_scale_for(f).map(|s| (s.lo, s.hi));
        assert_eq!(scale(&base, Format::Vlfeedback), Some((1.0, 5.0)));
        assert_eq!(scale(&base, Format::Rated), Some((0.0, 4.0)));
        // HelpSteer's aspects (some of them, any case) in VLFeedback's layout: HelpSteer's scale
        assert_eq!(scale(&with(&["Helpfulness", "correctness"]), Format::Vlfeedback), Some((0.0, 4.0)));
        assert_eq!(scale(&with(&["helpfulness", "coherence", "correctness"]), Format::Rated), Some((0.0, 4.0)));
        assert_eq!(scale(&with(&["visual faithfulness"]), Format::Vlfeedback), Some((1.0, 5.0)));
        // aspects of neither (vpa judge's Verified 0/1, Claims 0, -1, ...): no published scale
        assert_eq!(scale(&with(&["Verified"]), Format::Vlfeedback), None);
        assert_eq!(scale(&with(&["Claims"]), Format::Rated), None);
        let declared = BuildConfig { rating_range: Some((-3.0, 0.0)), ..with(&["Claims"]) };
        assert_eq!(scale(&declared, Format::Vlfeedback), Some((-3.0, 0.0)));
    }

    #[test]
    fn validate_names_the_flag() {
        let mut c = BuildConfig { inputs: vec!["x".into()], out: "o".into(), ..Default::default() };
        c.validate().unwrap();
        c.partition = (2, 2);
        assert!(c.validate().unwrap_err().to_string().contains("--partition"));
        c.partition = (0, 1);
        c.strategy = "nope".into();
        assert!(c.validate().unwrap_err().to_string().contains("--strategy"));
        c.strategy = "best-vs-rest".into();
        c.bt_prior = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("--bt-prior"));
    }

    #[test]
    fn recipes_fields_and_templates_are_checked() {
        let base = BuildConfig { inputs: vec!["x".into()], out: "o".into(), ..Default::default() };
        let c = BuildConfig { recipe: Some("mmdpo".into()), ..base.clone() }.effective().unwrap();
        assert_eq!((c.strategy.as_str(), c.score, c.min_margin), ("best-vs-random", Some(Score::Sum), Some(2.0)));
        assert_eq!(c.aspects.unwrap().len(), 3);
        let own = BuildConfig { recipe: Some("mmdpo".into()), score: Some(Score::Mean), min_margin: Some(1.0), ..base.clone() };
        let c = own.effective().unwrap();
        assert_eq!((c.score, c.min_margin), (Some(Score::Mean), Some(1.0)));
        let clash = BuildConfig { recipe: Some("seva".into()), strategy: "best-vs-rest".into(), ..base.clone() };
        assert!(clash.effective().unwrap_err().to_string().contains("--recipe seva"));
        let f = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let mapped = BuildConfig { fields: f(&[("prompt", "q"), ("chosen", "a.good")]), ..base.clone() }.effective().unwrap();
        assert_eq!(mapped.format, Format::Mapped);
        assert!(mapped.validate().unwrap_err().to_string().contains("--field rejected=PATH"));
        for bad in [f(&[("answer", "x")]), f(&[("prompt", "a..b")]), f(&[("prompt", "a"), ("prompt", "b")])] {
            let c = BuildConfig { fields: bad, ..base.clone() }.effective().unwrap();
            assert!(c.validate().unwrap_err().to_string().contains("--field"));
        }
        let forced = BuildConfig { fields: f(&[("prompt", "q")]), format: Format::Pairwise, ..base.clone() };
        assert!(forced.effective().unwrap().validate().unwrap_err().to_string().contains("--format mapped"));
        for (t, ok) in [("merged_images/{id}.jpg", true), ("a/{meta.id}-{{x}}.png", true), ("plain.jpg", false), ("{id", false), ("{}", false), ("a}b{id}", false)] {
            let c = BuildConfig { image_template: Some(t.into()), ..base.clone() };
            assert_eq!(c.validate().is_ok(), ok, "{t}");
        }
    }
}
