//! The build pipeline, streaming with bounded memory:
//!
//! 1. **Validate**: read each JSONL file in chunks; parse and validate text, ratings and images
//!    in parallel (on a wider I/O pool: each record reads an image file); append the validated
//!    image bytes once to a scratch blob (a video's file or frames are copied, by the thread that
//!    checked them, into a second scratch blob at a range of their own); spill valid records to buckets by a key that every
//!    record of a group shares (the group's shuffle key; with near-duplicate merging, its image)
//!    and rejects to `rejects.jsonl`.
//! 2. **Group and rank**: per bucket, deduplicate into groups, fit Bradley-Terry, select pairs.
//!    Buckets are ranges of the key, read in order, so when it is the shuffle key a bucket's
//!    samples go straight to step 3; with near-duplicate merging they are spilled again, to
//!    buckets by shuffle key, and step 3 reads those.
//! 3. **Write**: per bucket in order, sort by shuffle key, tar-encode in parallel (image bytes
//!    from the blob) and append to the train / val shards, hashing as they are written.
//!
//! Memory is bounded by what one spill bucket holds (see [`crate::spill`]), not by the input; a
//! build whose records fit one bucket keeps them in memory.

use crate::config::{BuildConfig, Format, Score, VLFEEDBACK_ASPECTS, HELPSTEER_ASPECTS};
use crate::dedup::{group, group_key, Group};
use crate::error::{Error, Result};
use crate::image;
use crate::container::{self, Body, Input};
use crate::manifest::{Counts, FileCounts, Manifest, FORMAT_VERSION};
use crate::layout::{self, Ctx};
use crate::outdir::OutDir;
use crate::rank::{fit, sigmoid, Comparisons};
use crate::record::{anchor, media_key, ImageRef, Record, Reject, Source, VideoKind, VideoRef};
use crate::row::ImageSrc;
use crate::report::Stats;
use crate::select::{self, Dropped, GroupView, Params};
use crate::shard::{encode_member, write_atomic, ShardWriter};
use crate::spill::{buckets_for, Spill};
use crate::text::{prompt_key, with_spaces_at};
use crate::video::{self, PutError, VideoBlob, VideoRead};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Lines validated in parallel at a time; with their image bytes in flight, this bounds memory.
const CHUNK_LINES: usize = 512;

/// First 8 bytes of sha256 over the parts, as a number: the stable hash behind keys, splits,
/// partitions and the shuffle.
pub fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

/// Which partition owns a valid record (by its [`anchor`]: image content, or the prompt of a
/// text-only record, so groups never straddle partitions).
fn owner_of_image(anchor: &str, n: u64) -> u64 {
    hash64(&[b"partition", anchor.as_bytes()]) % n
}

/// The spill bucket key of a valid record. Every record of one group must share a bucket: with
/// near-duplicate merging a group is any prompts on one image, so the key is the [`anchor`] (all
/// of an image's records share a bucket); without it a group is one (images, normalised prompt),
/// and the key is that group's shuffle key, so that buckets are ranges of the output order.
fn bucket_key(rec: &Record, cfg: &BuildConfig) -> u64 {
    if cfg.near_dup_threshold.is_some() {
        hash64(&[b"bucket", anchor(&rec.image_key, &rec.prompt_norm).as_bytes()])
    } else {
        // The group's shuffle key: buckets are then ranges of the output order (see stage 2).
        shuffle_key(cfg.seed, &group_key(&rec.image_key, &rec.prompt_norm))
    }
}

/// Which partition owns a record whose image is unknown (unparseable, or image unreadable).
fn owner_of_line(src: &Source, n: u64) -> u64 {
    hash64(&[b"partition", src.file.as_bytes(), &src.line.to_le_bytes()]) % n
}

/// Validation split by image hash: no image is in both train and val. Seed-independent on purpose,
/// so the held-out set stays put when only the shuffle seed changes.
pub fn is_val(image_sha256: &str, val_fraction: f64) -> bool {
    val_fraction > 0.0 && (hash64(&[b"split", image_sha256.as_bytes()]) as f64 / 2f64.powi(64)) < val_fraction
}

/// The split of a group: a single image (or video) goes by its hash ([`is_val`], as in format 1);
/// a text-only group by its anchor (its prompt); a group with several images and videos goes where
/// all of them go, and when they fall on both sides it is dropped (`Err`, with the reason), so
/// that no image or video is ever in both train and val.
fn split_of(images: &[ImageRef], videos: &[VideoRef], anchor: &str, val_fraction: f64) -> std::result::Result<bool, String> {
    let units: Vec<&str> = images.iter().map(|i| i.sha256.as_str()).chain(videos.iter().map(|v| v.sha256.as_str())).collect();
    if units.is_empty() {
        return Ok(is_val(anchor, val_fraction));
    }
    let val = units.iter().filter(|sha| is_val(sha, val_fraction)).count();
    if val == 0 || val == units.len() {
        Ok(val > 0)
    } else if videos.is_empty() {
        Err(format!(
            "its {} images fall on both sides of the train/val split ({val} held out by --val-fraction): \
             a multi-image sample must lie wholly in one split so that no image is in both",
            images.len()
        ))
    } else {
        Err(format!(
            "its {} images and {} videos fall on both sides of the train/val split ({val} held out by --val-fraction): \
             a sample must lie wholly in one split so that no image or video is in both",
            images.len(),
            videos.len()
        ))
    }
}

fn shuffle_key(seed: u64, key: &str) -> u64 {
    hash64(&[b"shuffle", &seed.to_le_bytes(), key.as_bytes()])
}

/// What the sample JSON holds for one response.
#[derive(Serialize)]
struct ResponseOut<'a> {
    text: &'a str,
    model: Option<&'a str>,
    scores: &'a BTreeMap<String, f64>,
    strength: f64,
}

#[derive(Serialize)]
struct PairOut<'a> {
    chosen: usize,
    rejected: usize,
    probability: f64,
    margin: f64,
    /// Reference log-probs the input shipped for this pair, with where they came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    ref_logps: Option<RefLogpsOut<'a>>,
}

#[derive(Serialize)]
struct RefLogpsOut<'a> {
    chosen: f64,
    rejected: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    chosen_avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected_avg: Option<f64>,
    /// Input fields they were read from, the record, and the model (`--ref-logp-model`).
    fields: &'a str,
    source: serde_json::Value,
    model: Option<&'a str>,
}

/// One image of a sample: its tar member (after `{key}.`), sha256, and where it sits in the
/// prompt (`offset`: chars of the stored prompt before it), in placeholder order.
#[derive(Serialize)]
struct ImageOut<'a> {
    member: String,
    sha256: &'a str,
    offset: usize,
}

/// One video of a sample: `file` (one member, the container as it came) or `frames` (a member
/// per frame image, in order); the sha256 of the file's bytes, or over the frames' sha256 hex
/// digests joined by newlines; and where it sits in the prompt, as an image's `offset`.
#[derive(Serialize)]
struct VideoOut<'a> {
    kind: &'static str,
    members: Vec<String>,
    sha256: &'a str,
    offset: usize,
}

#[derive(Serialize)]
struct SampleOut<'a> {
    key: &'a str,
    prompt: &'a str,
    /// The first image's sha256 (`null` for a text-only sample); `images` lists them all.
    image_sha256: Option<&'a str>,
    images: Vec<ImageOut<'a>>,
    /// Absent for a sample without videos (whose JSON stays as it was before videos existed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    videos: Vec<VideoOut<'a>>,
    responses: Vec<ResponseOut<'a>>,
    pairs: Vec<PairOut<'a>>,
    source: Vec<serde_json::Value>,
}

/// Tar member name (after `{key}.`) of a sample's image `i`: `0.jpg`, `1.png`, ... The stock
/// WebDataset reader splits a member name at the first dot of its base name, so `{key}.0.jpg`,
/// `{key}.1.png` and `{key}.json` are one sample with fields `0.jpg`, `1.png` and `json`.
pub fn image_member(i: usize, ext: &str) -> String {
    format!("{i}.{ext}")
}

/// Tar member name (after `{key}.`) of a sample's video `i` stored as a file: `v0.mp4`, ...
pub fn video_member(i: usize, ext: &str) -> String {
    format!("v{i}.{ext}")
}

/// Tar member name (after `{key}.`) of frame `j` of a sample's video `i`: `v0.f0000.jpg`, ...
/// (still one sample for the WebDataset reader, which splits at the first dot).
pub fn frame_member(i: usize, j: usize, ext: &str) -> String {
    format!("v{i}.f{j:04}.{ext}")
}

/// One media member of a finished sample: its name after `{key}.`, which scratch blob holds its
/// bytes (the video blob for a video's file or frames, the image blob for images) and where.
#[derive(Serialize, Deserialize)]
struct Media {
    member: String,
    in_video_blob: bool,
    offset: u64,
    len: u64,
}

/// A finished sample on its way to a shard.
#[derive(Serialize, Deserialize)]
struct Finished {
    order: u64,
    key: String,
    val: bool,
    json: String,
    /// Its images', then its videos' members, in order.
    media: Vec<Media>,
    pairs: u64,
    responses: u64,
}

enum Line {
    Blank,
    OtherPartition,
    Rejected(Vec<Reject>),
    /// A valid record, its response rejects, and its images' bytes (in order); its videos are in
    /// the video blob already.
    Kept(Box<Record>, Vec<Reject>, Vec<Vec<u8>>),
    /// Writing a scratch blob failed: the build stops with this error.
    Fatal(Error),
}

struct FileCtx<'a> {
    label: String,
    format: Format,
    aspects: Vec<(String, f64)>,
    rating_scale: Option<crate::config::RatingScale>,
    image_root: PathBuf,
    cfg: &'a BuildConfig,
    /// Where checked video files are copied (see [`VideoBlob`]).
    videos: &'a VideoBlob,
    /// Set on Ctrl-C: records not yet checked are skipped (their chunk is discarded).
    cancel: &'a AtomicBool,
}

fn validate_item(item: container::Item, fc: &FileCtx) -> Line {
    let src = item.src;
    // A record rejected before its images are known belongs to the partition its (file, line) picks.
    let unowned_reject = |mut earlier: Vec<Reject>, r: Reject| {
        if owner_of_line(&r_src(&r), fc.cfg.partition.1) != fc.cfg.partition.0 {
            Line::OtherPartition
        } else {
            earlier.push(r);
            Line::Rejected(earlier)
        }
    };
    let ctx = Ctx {
        src: &src,
        aspects: &fc.aspects,
        max_text_chars: fc.cfg.max_text_chars,
        fields: &fc.cfg.fields,
        image_template: fc.cfg.image_template.as_deref(),
        rating_scale: fc.rating_scale,
        n_videos: 0,
    };
    let (draft, response_rejects, mut blobs) = match item.body {
        Body::Blank => return Line::Blank,
        Body::TooLarge(n) => {
            let why = format!("record is {n} bytes, over the limit of {} (--max-record-bytes)", fc.cfg.max_record_bytes);
            return unowned_reject(vec![], Reject::record(&src, "$", why));
        }
        Body::Broken(why) => return unowned_reject(vec![], Reject::record(&src, "$", why)),
        Body::Row(row) => {
            let parsed = layout::parse(&row.value, fc.format, &ctx);
            match parsed.draft {
                Ok(d) => (d, parsed.response_rejects, row.blobs),
                Err(r) => return unowned_reject(parsed.response_rejects, r),
            }
        }
        Body::Text(raw) => {
            if raw.len() > fc.cfg.max_record_bytes {
                let why = format!("record is {} bytes, over the limit of {} (--max-record-bytes)", raw.len(), fc.cfg.max_record_bytes);
                return unowned_reject(vec![], Reject::record(&src, "$", why));
            }
            let text = match std::str::from_utf8(&raw) {
                Ok(t) => t,
                Err(e) => return unowned_reject(vec![], Reject::record(&src, "$", format!("invalid UTF-8: {e}"))),
            };
            let fast = match fc.format {
                Format::Vlfeedback => layout::vlfeedback_fast(text, &ctx),
                _ => None,
            };
            match fast {
                Some(d) => (d, vec![], vec![]),
                None => {
                    let value: serde_json::Value = match serde_json::from_str(text) {
                        Ok(v) => v,
                        Err(e) => return unowned_reject(vec![], Reject::record(&src, "$", format!("malformed JSON: {e}"))),
                    };
                    let parsed = layout::parse(&value, fc.format, &ctx);
                    match parsed.draft {
                        Ok(d) => (d, parsed.response_rejects, vec![]),
                        Err(r) => return unowned_reject(parsed.response_rejects, r),
                    }
                }
            }
        }
    };
    validate_draft(draft, response_rejects, &mut blobs, src, fc)
}

/// The position a reject names, as a [`Source`] (for the owner of a record rejected early).
fn r_src(r: &Reject) -> Source {
    Source { file: r.file.clone(), line: r.line, index: r.index, row_group: r.row_group, row: r.row }
}

/// Read, own and check a parsed record's images and videos; `blobs` are its row's embedded bytes
/// (taken). A checked video file is copied into the video blob here, on the validating thread.
fn validate_draft(draft: layout::Draft, mut response_rejects: Vec<Reject>, blobs: &mut [Vec<u8>], src: Source, fc: &FileCtx) -> Line {
    if fc.cancel.load(Ordering::Relaxed) {
        return Line::Blank; // interrupted: the chunk is discarded, so skip the image work
    }
    let (part, parts) = fc.cfg.partition;
    let unowned_reject = |mut earlier: Vec<Reject>, r: Reject| {
        if owner_of_line(&src, parts) != part {
            Line::OtherPartition
        } else {
            earlier.push(r);
            Line::Rejected(earlier)
        }
    };
    if draft.responses.len() > fc.cfg.max_responses {
        let why = format!("{} responses, over the limit of {} per group (--max-responses)", draft.responses.len(), fc.cfg.max_responses);
        return unowned_reject(response_rejects, Reject::record(&src, "responses", why));
    }
    let field = |i: usize| if draft.images.len() == 1 { "image".to_string() } else { format!("images[{i}]") };
    let mut imgs = Vec::with_capacity(draft.images.len());
    for (i, im) in draft.images.iter().enumerate() {
        let read = match im {
            ImageSrc::Path(p) => image::read(&image::resolve(p, &fc.image_root)),
            ImageSrc::Embedded { index, .. } => match blobs.get_mut(*index) {
                Some(b) => image::from_bytes(std::mem::take(b), PathBuf::from(im.label())),
                None => Err(format!("{} names no embedded image (only Parquet binary columns embed bytes)", im.label())),
            },
        };
        match read {
            Ok(img) => imgs.push(img),
            Err(reason) => return unowned_reject(response_rejects, Reject::record(&src, field(i), reason)),
        }
    }
    let vfield = |i: usize| draft.video_fields.get(i).cloned().unwrap_or_else(|| format!("videos[{i}]"));
    let mut vids: Vec<VideoRead> = Vec::with_capacity(draft.videos.len());
    for (i, v) in draft.videos.iter().enumerate() {
        if fc.cancel.load(Ordering::Relaxed) {
            return Line::Blank;
        }
        match video::read(v, &fc.image_root, fc.cfg.max_video_bytes, blobs, fc.cancel) {
            Ok(r) => vids.push(r),
            Err(_) if fc.cancel.load(Ordering::Relaxed) => return Line::Blank,
            Err(reason) => return unowned_reject(response_rejects, Reject::record(&src, vfield(i), reason)),
        }
    }
    // Keyed as the prompt was written (a placeholder counts as a space), wherever its media sit.
    let mut at: Vec<usize> = draft.image_at.iter().chain(&draft.video_at).copied().collect();
    at.sort_unstable();
    let prompt_norm = prompt_key(&with_spaces_at(&draft.prompt, &at), fc.cfg.dedup_mode());
    let image_shas: Vec<&str> = imgs.iter().map(|i| i.sha256.as_str()).collect();
    let video_shas: Vec<&str> = vids.iter().map(VideoRead::sha256).collect();
    let key = media_key(&image_shas, &video_shas);
    if owner_of_image(&anchor(&key, &prompt_norm), parts) != part {
        return Line::OtherPartition;
    }
    for (i, img) in imgs.iter().enumerate() {
        if let Err(reason) = image::check(img, fc.cfg.image_check, fc.cfg.max_image_pixels) {
            response_rejects.push(Reject::record(&src, field(i), reason));
            return Line::Rejected(response_rejects);
        }
    }
    for (i, v) in vids.iter().enumerate() {
        if let Err(reason) = video::check_frames(v, fc.cfg.image_check, fc.cfg.max_image_pixels) {
            response_rejects.push(Reject::record(&src, vfield(i), reason));
            return Line::Rejected(response_rejects);
        }
    }
    let image_ref = |i: &image::ImageFile| ImageRef {
        path: i.path.to_string_lossy().to_string(),
        sha256: i.sha256.clone(),
        ext: i.ext.to_string(),
        offset: 0,
        len: i.bytes.len() as u64,
    };
    // Into the video blob now, from this thread: a record's video bytes are never held in flight
    // with the chunk (a frame folder can be many megabytes).
    let mut videos = Vec::with_capacity(vids.len());
    for (i, v) in vids.into_iter().enumerate() {
        let put = match v {
            VideoRead::File(f) => fc.videos.put(&f, fc.cancel).map(|offset| {
                let kind = VideoKind::File { ext: f.ext.to_string(), offset, len: f.len };
                VideoRef { path: f.label.to_string_lossy().to_string(), sha256: f.sha256, kind }
            }),
            VideoRead::Frames { label, frames, sha256 } => frames
                .iter()
                .map(|f| fc.videos.put_bytes(&f.bytes).map(|offset| ImageRef { offset, ..image_ref(f) }))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(|refs| VideoRef { path: label.to_string_lossy().to_string(), sha256, kind: VideoKind::Frames(refs) }),
        };
        match put {
            Ok(v) => videos.push(v),
            Err(PutError::Reject(reason)) => {
                response_rejects.push(Reject::record(&src, vfield(i), reason));
                return Line::Rejected(response_rejects);
            }
            Err(PutError::Output(path, e)) => return Line::Fatal(Error::output(&path, e)),
            Err(PutError::Cancelled) => return Line::Blank,
        }
    }
    let images = imgs.iter().map(image_ref).collect();
    let record = Record {
        prompt_norm,
        prompt: draft.prompt,
        image_at: draft.image_at,
        images,
        videos,
        video_at: draft.video_at,
        image_key: key,
        responses: draft.responses,
        explicit_pairs: draft.explicit_pairs,
        pair_ref_logps: draft.pair_ref_logps,
        source: src,
    };
    Line::Kept(Box::new(record), response_rejects, imgs.into_iter().map(|i| i.bytes).collect())
}

/// Records a layout is detected from at most, and the largest one parsed for it: a file's layout
/// is that of its first record (of these) that says, so a huge first line is not parsed twice.
const DETECT_RECORDS: usize = 10_000;
const DETECT_MAX_BYTES: usize = 4 << 20;

/// Detect an input's layout from its first records that parse and say which layout they are.
fn detect_layout(input: &Input, cfg: &BuildConfig) -> Result<Option<Format>> {
    let mut reader = container::open(input, cfg.max_record_bytes.min(DETECT_MAX_BYTES))?;
    let mut seen = 0;
    while seen < DETECT_RECORDS {
        let chunk = reader.next_chunk(64)?;
        if chunk.is_empty() {
            break;
        }
        for item in chunk {
            seen += 1;
            let found = match &item.body {
                Body::Text(t) => serde_json::from_slice::<serde_json::Value>(t).ok().and_then(|v| layout::detect(&v)),
                Body::Row(r) => layout::detect(&r.value),
                Body::Broken(_) => return Ok(None),
                _ => None,
            };
            if found.is_some() {
                return Ok(found);
            }
        }
    }
    Ok(None)
}

fn progress(cfg: &BuildConfig, len: u64, what: &str) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = if what == "validate" {
        "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} eta {eta}"
    };
    pb.set_style(ProgressStyle::with_template(style).unwrap().progress_chars("=> "));
    pb.set_prefix(what.to_string());
    pb
}

/// Wall and process CPU time (user + system, all threads) per stage, for `RUST_PAIRS_TIMINGS`:
/// on a shared machine the CPU time is the figure that compares.
struct StageClock {
    wall: std::time::Instant,
    cpu: f64,
}

fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

impl StageClock {
    fn new() -> Self {
        StageClock { wall: std::time::Instant::now(), cpu: process_cpu_seconds() }
    }
    fn lap(&mut self, stage: &str) {
        let now = StageClock::new();
        eprintln!("rust_pairs: {stage} {:.3}s (cpu {:.3}s)", (now.wall - self.wall).as_secs_f64(), now.cpu - self.cpu);
        *self = now;
    }
}

/// Aspect weights across formats: the declared ones, or every default aspect with weight 1.
/// A handful of entries, so a linear scan beats hashing.
struct Weights(Vec<(String, f64)>);

impl Weights {
    fn new(cfg: &BuildConfig) -> Self {
        Weights(match &cfg.aspects {
            Some(a) => a.clone(),
            None => VLFEEDBACK_ASPECTS.iter().chain(HELPSTEER_ASPECTS.iter()).map(|a| (a.to_string(), 1.0)).collect(),
        })
    }
    fn get(&self, aspect: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == aspect).map(|(_, w)| *w)
    }
}

/// Outcome of ranking one group.
enum Ranked {
    Sample(Finished),
    Dropped(&'static str, String),
}

fn rank_group(g: &Group, cfg: &BuildConfig, w: &Weights, counts: &mut Counts, stats: &mut Stats) -> Ranked {
    let n = g.responses.len();
    counts.responses_collapsed += g.collapsed;
    counts.prompts_near_duplicate += g.near_dup_merged;
    counts.pairs_dropped_identical += g.identical_pairs;
    // Pooled duplicates can exceed the per-record limit; ranking is quadratic in K, so it is a reject.
    if n > cfg.max_responses {
        return Ranked::Dropped("responses", format!(
            "group has {n} distinct responses after deduplication, over the limit of {} (--max-responses)",
            cfg.max_responses
        ));
    }
    // A text-only group is split by its key (its normalised prompt).
    let val = match split_of(&g.images, &g.videos, &format!("text\0{}", g.key), cfg.val_fraction) {
        Ok(v) => v,
        Err(why) => return Ranked::Dropped(if g.videos.is_empty() { "images" } else { "videos" }, why),
    };
    let mut comp = Comparisons::new(n);
    let score = cfg.score_mode();
    // Weighted mean (or sum, `--score sum`) of each response's aspect ratings.
    let mean: Vec<Option<f64>> = g
        .responses
        .iter()
        .map(|r| {
            let (s, tw) = r.scores.iter().fold((0.0, 0.0), |(s, tw), (a, x)| {
                let wa = w.get(a).unwrap_or(0.0);
                (s + wa * x, tw + wa)
            });
            (tw > 0.0).then(|| match score {
                Score::Mean => s / tw,
                Score::Sum => s,
            })
        })
        .collect();
    for i in 0..n {
        for j in (i + 1)..n {
            for (a, x) in &g.responses[i].scores {
                let (Some(y), Some(wa)) = (g.responses[j].scores.get(a), w.get(a)) else { continue };
                if wa <= 0.0 {
                    continue;
                }
                if x > y {
                    comp.win(i, j, wa);
                } else if y > x {
                    comp.win(j, i, wa);
                } else {
                    comp.tie(i, j, wa);
                }
            }
        }
    }
    for &(c, r) in &g.explicit_pairs {
        comp.win(c, r, 1.0);
    }
    let theta = fit(&comp, cfg.bt_prior);

    // Report statistics cover every valid group, written or not.
    for r in &g.responses {
        stats.response(r.model.as_deref(), &r.scores);
    }
    for i in 0..n {
        for j in (i + 1)..n {
            let (Some(mi), Some(mj)) = (&g.responses[i].model, &g.responses[j].model) else { continue };
            let (Some(si), Some(sj)) = (mean[i], mean[j]) else { continue };
            if mi == mj {
                continue;
            }
            if si > sj {
                stats.model_comparison(mi, mj, 1.0);
            } else if sj > si {
                stats.model_comparison(mj, mi, 1.0);
            } else {
                stats.model_comparison(mi, mj, 0.5);
                stats.model_comparison(mj, mi, 0.5);
            }
        }
    }

    let strategy = select::strategy(&cfg.strategy).expect("strategy validated");
    let params = Params { min_margin: cfg.min_margin.unwrap_or(strategy.default_margin), min_probability: cfg.min_probability };
    let mut dropped = Dropped::default();
    let random = hash64(&[b"random", &cfg.seed.to_le_bytes(), g.key.as_bytes()]);
    let choosable: Vec<bool> = g
        .responses
        .iter()
        .map(|r| !r.model.as_ref().is_some_and(|m| cfg.exclude_chosen_models.contains(m)))
        .collect();
    if let Some(cycle) = preference_cycle(n, &g.explicit_pairs) {
        counts.groups_contradictory += 1;
        let shown: Vec<String> = cycle.iter().map(|&i| format!("{:?}", excerpt(&g.responses[i].text))).collect();
        return Ranked::Dropped("responses", format!("pairwise annotations contradict each other: {} (a cycle of preferences)", shown.join(" > ")));
    }
    let view = GroupView { mean: &mean, theta: &theta, random, choosable: &choosable };
    let mut pairs = if n >= 2 { (strategy.select)(&view, &params, &mut dropped) } else { vec![] };

    // Explicit pairs: one direction per unordered pair, the one the fit prefers.
    let mut seen: Vec<(usize, usize)> = pairs.iter().map(|&(a, b)| (a.min(b), a.max(b))).collect();
    let mut pref_wins = vec![0.0; n];
    let mut pref_games = vec![0.0; n];
    for &(c, r) in &g.explicit_pairs {
        pref_wins[c] += 1.0;
        pref_games[c] += 1.0;
        pref_games[r] += 1.0;
        if let Some(mc) = &g.responses[c].model {
            if let Some(mr) = &g.responses[r].model {
                if mc != mr {
                    stats.model_comparison(mc, mr, 1.0);
                }
            }
        }
    }
    let preference: Vec<Option<f64>> = (0..n).map(|i| (pref_games[i] > 0.0).then(|| pref_wins[i] / pref_games[i])).collect();
    for &(c, r) in &g.explicit_pairs {
        let unordered = (c.min(r), c.max(r));
        if seen.contains(&unordered) {
            continue;
        }
        seen.push(unordered);
        let (c, r) = if theta[r] > theta[c] { (r, c) } else { (c, r) };
        if theta[c] == theta[r] {
            counts.pairs_dropped_conflicting += 1;
        } else if !choosable[c] {
            dropped.excluded += 1;
        } else if strategy.filters_probability && sigmoid(theta[c] - theta[r]) < cfg.min_probability {
            dropped.probability += 1;
        } else {
            pairs.push((c, r));
        }
    }
    counts.pairs_dropped_ties += dropped.ties;
    counts.pairs_dropped_margin += dropped.margin;
    counts.pairs_dropped_probability += dropped.probability;
    counts.pairs_dropped_excluded += dropped.excluded;

    if pairs.is_empty() {
        let why = if n < 2 && g.identical_pairs > 0 {
            format!(
                "chosen and rejected are the same response under --dedup {} (identical {})",
                serde_json::to_value(cfg.dedup_mode()).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                g.identical_pairs
            )
        } else if n < 2 {
            "fewer than two distinct rankable responses after deduplication".to_string()
        } else {
            format!(
                "strategy {} selected no pair (ties {}, below margin {}, below probability {}, identical {}, chosen model excluded {})",
                cfg.strategy, dropped.ties, dropped.margin, dropped.probability, g.identical_pairs, dropped.excluded
            )
        };
        return Ranked::Dropped("responses", why);
    }

    // Responses ranked by strength (stable on ties); pair indices follow.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| theta[b].total_cmp(&theta[a]).then(a.cmp(&b)));
    let mut pos = vec![0; n];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    let scores_of = |i: usize| -> BTreeMap<String, f64> {
        match preference[i] {
            Some(p) if g.responses[i].scores.is_empty() => [("preference".to_string(), p)].into(),
            _ => g.responses[i].scores.clone(),
        }
    };
    let all_scores: Vec<BTreeMap<String, f64>> = (0..n).map(scores_of).collect();
    let level = |i: usize| mean[i].or(preference[i]).unwrap_or(0.0);
    let mut pair_out: Vec<PairOut> = pairs
        .iter()
        .map(|&(c, r)| PairOut {
            chosen: pos[c],
            rejected: pos[r],
            probability: sigmoid(theta[c] - theta[r]),
            margin: level(c) - level(r),
            ref_logps: shipped_ref_logps(g, c, r, cfg.ref_logp_model.as_deref()),
        })
        .collect();
    pair_out.sort_by_key(|p| (p.chosen, p.rejected));
    for p in &pair_out {
        stats.pair(p.margin, p.probability);
    }
    stats.group(n, pair_out.len());
    let sample = SampleOut {
        key: &g.key,
        prompt: &g.prompt,
        image_sha256: g.images.first().map(|i| i.sha256.as_str()),
        images: g
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| ImageOut { member: image_member(i, &im.ext), sha256: &im.sha256, offset: g.image_at.get(i).copied().unwrap_or(0) })
            .collect(),
        videos: g
            .videos
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (kind, members) = match &v.kind {
                    VideoKind::File { ext, .. } => ("file", vec![video_member(i, ext)]),
                    VideoKind::Frames(frames) => ("frames", frames.iter().enumerate().map(|(j, f)| frame_member(i, j, &f.ext)).collect()),
                };
                VideoOut { kind, members, sha256: &v.sha256, offset: g.video_at.get(i).copied().unwrap_or(0) }
            })
            .collect(),
        responses: order
            .iter()
            .map(|&i| ResponseOut { text: &g.responses[i].text, model: g.responses[i].model.as_deref(), scores: &all_scores[i], strength: theta[i] })
            .collect(),
        pairs: pair_out,
        source: g.sources.iter().map(Source::to_json).collect(),
    };
    let npairs = sample.pairs.len() as u64;
    Ranked::Sample(Finished {
        order: shuffle_key(cfg.seed, &g.key),
        key: g.key.clone(),
        val,
        json: serde_json::to_string(&sample).expect("sample serialises"),
        media: sample_media(g),
        pairs: npairs,
        responses: n as u64,
    })
}

/// A group's media members in shard order: its images, then each video's file or frames.
fn sample_media(g: &Group) -> Vec<Media> {
    let mut out: Vec<Media> = g
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| Media { member: image_member(i, &im.ext), in_video_blob: false, offset: im.offset, len: im.len })
        .collect();
    for (i, v) in g.videos.iter().enumerate() {
        match &v.kind {
            VideoKind::File { ext, offset, len } => out.push(Media { member: video_member(i, ext), in_video_blob: true, offset: *offset, len: *len }),
            VideoKind::Frames(frames) => out.extend(
                frames
                    .iter()
                    .enumerate()
                    .map(|(j, f)| Media { member: frame_member(i, j, &f.ext), in_video_blob: true, offset: f.offset, len: f.len }),
            ),
        }
    }
    out
}

/// The reference log-probs an input shipped for the explicit pair `(c, r)` (either direction).
fn shipped_ref_logps<'a>(g: &'a Group, c: usize, r: usize, model: Option<&'a str>) -> Option<RefLogpsOut<'a>> {
    g.explicit_pairs.iter().zip(&g.pair_ref_logps).find_map(|(&(pc, pr), lp)| {
        let (lp, source) = lp.as_ref().map(|(lp, s)| (lp, s))?;
        let out = |chosen, rejected, chosen_avg, rejected_avg| RefLogpsOut { chosen, rejected, chosen_avg, rejected_avg, fields: &lp.fields, source: source.to_json(), model };
        if (pc, pr) == (c, r) {
            Some(out(lp.chosen, lp.rejected, lp.chosen_avg, lp.rejected_avg))
        } else if (pc, pr) == (r, c) {
            Some(out(lp.rejected, lp.chosen, lp.rejected_avg, lp.chosen_avg))
        } else {
            None
        }
    })
}

/// A cycle in the explicit preferences (A > B and B > A, or A > B > C > A), as response indices
/// with the first repeated at the end; `None` when they are consistent.
fn preference_cycle(n: usize, pairs: &[(usize, usize)]) -> Option<Vec<usize>> {
    let mut next: Vec<Vec<usize>> = vec![vec![]; n];
    for &(c, r) in pairs {
        if !next[c].contains(&r) {
            next[c].push(r);
        }
    }
    // Iterative DFS with colours: 0 unseen, 1 on the stack, 2 done.
    let mut colour = vec![0u8; n];
    for start in 0..n {
        if colour[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        colour[start] = 1;
        while let Some(&mut (v, ref mut k)) = stack.last_mut() {
            if let Some(&w) = next[v].get(*k) {
                *k += 1;
                match colour[w] {
                    0 => {
                        colour[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(x, _)| x == w).unwrap();
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(x, _)| x).collect();
                        cycle.push(w);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                colour[v] = 2;
                stack.pop();
            }
        }
    }
    None
}

fn excerpt(s: &str) -> String {
    let t: String = s.chars().take(40).collect();
    if t.len() < s.len() { format!("{t}…") } else { t }
}

fn config_json(cfg: &BuildConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    let o = v.as_object_mut().unwrap();
    for k in ["out", "progress", "threads", "io_threads", "fsync", "partition"] {
        o.remove(k);
    }
    v
}

/// Run a build; returns its manifest (also written to the output directory).
pub fn build(cfg: &BuildConfig) -> Result<Manifest> {
    build_cancellable(cfg, &AtomicBool::new(false))
}

/// [`build`], stopped with [`Error::Interrupted`] soon after `cancel` is set (the Python layer
/// sets it on Ctrl-C). An interrupted build removes the shards, partial files and scratch it
/// can prove are its own and leaves no manifest.
pub fn build_cancellable(cfg: &BuildConfig, cancel: &AtomicBool) -> Result<Manifest> {
    let cfg = &cfg.effective()?;
    cfg.validate()?;
    let _retain = crate::alloc::RetainFreed::new();
    let run = || build_inner(cfg, cancel);
    match cfg.threads {
        Some(t) => rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .map_err(|e| Error::Config(format!("--threads: {e}")))?
            .install(run),
        None => run(),
    }
}

/// The build's last step: finished samples, a bucket at a time in shuffle order, into the train
/// and val shards; each sample's images and videos are read from the scratch blobs into its tar
/// members.
struct SampleWriter<'a> {
    train: ShardWriter,
    val: ShardWriter,
    blob: File,
    blob_path: &'a Path,
    video_blob: File,
    video_blob_path: &'a Path,
    out: &'a Path,
    /// The pool to read the blob on: the I/O pool when the build read image files (reading their
    /// bytes back may wait on the disk as validation did); else the build's (CPU-bound).
    io_pool: Option<&'a rayon::ThreadPool>,
    pb: ProgressBar,
}

impl<'a> SampleWriter<'a> {
    fn new(
        cfg: &BuildConfig,
        out: &'a Path,
        suffix: &str,
        outdir: &Arc<OutDir>,
        blob_path: &'a Path,
        video_blob_path: &'a Path,
        io_pool: Option<&'a rayon::ThreadPool>,
    ) -> Result<Self> {
        let shards = |split| {
            let mut w = ShardWriter::new(out, split, suffix, cfg.max_samples_per_shard, cfg.max_shard_bytes);
            w.durable = cfg.fsync;
            w.outdir = Some(outdir.clone());
            w
        };
        Ok(SampleWriter {
            train: shards("train"),
            val: shards("val"),
            blob: File::open(blob_path).map_err(|e| Error::output(blob_path, e))?,
            blob_path,
            video_blob: File::open(video_blob_path).map_err(|e| Error::output(video_blob_path, e))?,
            video_blob_path,
            out,
            io_pool,
            pb: ProgressBar::hidden(),
        })
    }

    /// Write one bucket's samples sorted by shuffle key (every key of a bucket is above those of
    /// the buckets before it, so the shards come out in one global order).
    fn write_bucket(&mut self, mut items: Vec<Finished>, stop: &(dyn Fn() -> Result<()> + Sync)) -> Result<()> {
        items.sort_by(|a, b| (a.order, &a.key).cmp(&(b.order, &b.key)));
        let (blob, blob_path, out, io_pool) = (&self.blob, self.blob_path, self.out, self.io_pool);
        let (video_blob, video_blob_path) = (&self.video_blob, self.video_blob_path);
        let encode = |batch: &[Finished]| -> Vec<Result<Vec<u8>>> {
            let work = || {
                batch
                    .par_iter()
                    .map(|f| {
                        // Images and videos are read from the scratch blobs straight into the tar buffer.
                        let json = f.json.as_bytes();
                        let media_bytes: u64 = f.media.iter().map(|m| m.len).sum();
                        let mut enc = Vec::with_capacity((2 + 2 * f.media.len()) * 512 + media_bytes as usize + json.len());
                        for m in &f.media {
                            let (src, src_path) = if m.in_video_blob { (video_blob, video_blob_path) } else { (blob, blob_path) };
                            let mut read = Ok(());
                            let name = format!("{}.{}", f.key, m.member);
                            encode_member(&mut enc, &name, m.len as usize, |buf| read = src.read_exact_at(buf, m.offset))
                                .map_err(|e| Error::output(out, e))?;
                            read.map_err(|e| Error::output(src_path, e))?;
                        }
                        encode_member(&mut enc, &format!("{}.json", f.key), json.len(), |buf| buf.copy_from_slice(json))
                            .map_err(|e| Error::output(out, e))?;
                        Ok(enc)
                    })
                    .collect()
            };
            match io_pool {
                Some(pool) => pool.install(work),
                None => work(),
            }
        };
        // Pipeline: batch k is appended (and hashed, sequentially) while batch k+1 is encoded.
        let (train, val, pb) = (&mut self.train, &mut self.val, &self.pb);
        let mut pending: Option<(&[Finished], Vec<Result<Vec<u8>>>)> = None;
        let mut batches = batches(&items).into_iter();
        loop {
            stop()?;
            let next = batches.next();
            let (appended, encoded) = rayon::join(
                || -> Result<()> {
                    if let Some((batch, encoded)) = pending.take() {
                        for (f, enc) in batch.iter().zip(encoded) {
                            let w = if f.val { &mut *val } else { &mut *train };
                            w.append_encoded(&enc?, f.pairs, f.responses)?;
                            pb.inc(1);
                        }
                    }
                    Ok(())
                },
                || next.map(|b| (b, encode(b))),
            );
            appended?;
            match encoded {
                Some(e) => pending = Some(e),
                None => return Ok(()),
            }
        }
    }
}

/// Samples encoded at once: at most 512 samples and 256 MiB of members (a larger sample is a batch
/// of its own), so writing holds two batches in memory, not 512 samples' videos.
fn batches(items: &[Finished]) -> Vec<&[Finished]> {
    const MAX_SAMPLES: usize = 512;
    const MAX_BYTES: u64 = 256 << 20;
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, f) in items.iter().enumerate() {
        let b = f.media.iter().map(|m| m.len).sum::<u64>() + f.json.len() as u64;
        if i > start && (i - start == MAX_SAMPLES || bytes + b > MAX_BYTES) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

fn build_inner(cfg: &BuildConfig, cancel: &AtomicBool) -> Result<Manifest> {
    let (files, skipped) = container::expand(&cfg.inputs, cfg.image_root.as_deref().map(Path::new))?;
    let out = PathBuf::from(&cfg.out);
    let suffix = cfg.partition_suffix();
    // Lock --out, prove what it may touch, and invalidate the previous manifest (see outdir).
    let outdir = Arc::new(OutDir::claim(&out, &suffix)?);
    // Checked between chunks, buckets and batches: an interrupt stops the build within a chunk's work.
    let stop = || -> Result<()> {
        if cancel.load(Ordering::Relaxed) {
            outdir.discard()?;
            return Err(Error::Interrupted);
        }
        Ok(())
    };
    let spill_dir = out.join(OutDir::spill_name(&suffix));
    if spill_dir.exists() {
        std::fs::remove_dir_all(&spill_dir).map_err(|e| Error::output(&spill_dir, e))?;
    }
    std::fs::create_dir_all(&spill_dir).map_err(|e| Error::output(&spill_dir, e))?;
    let total_bytes: u64 = files.iter().map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0)).sum();
    let nb = buckets_for(0, total_bytes, cfg.spill_bucket_bytes); // by input size: the records' count is not known yet

    let mut counts = Counts::default();
    // Per input file: records in / used / deduplicated / rejected (attributed by each record's source).
    let mut per_file: BTreeMap<String, FileCounts> = BTreeMap::new();
    for s in skipped {
        per_file.insert(s.file.clone(), FileCounts { file: s.file, container: "none".into(), skipped: Some(s.reason), ..Default::default() });
    }
    let mut rejects = Vec::<u8>::new();
    let write_rejects = |rs: &[Reject], buf: &mut Vec<u8>| {
        for r in rs {
            serde_json::to_writer(&mut *buf, r).expect("reject serialises");
            buf.push(b'\n');
        }
    };
    let rejects_name = format!("rejects{suffix}.jsonl");
    let report_name = format!("report{suffix}.json");
    let manifest_name = OutDir::manifest_name(&suffix);
    for n in [&rejects_name, &report_name, &manifest_name] {
        outdir.own(n)?;
    }
    let rejects_path = out.join(&rejects_name);
    let rejects_tmp = out.join(format!(".rejects{suffix}.jsonl.partial"));
    let mut rejects_file = BufWriter::new(File::create(&rejects_tmp).map_err(|e| Error::output(&rejects_tmp, e))?);

    // Stage timings on stderr, for profiling.
    let timings = std::env::var_os("RUST_PAIRS_TIMINGS").is_some();
    let io_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.io_threads)
        .thread_name(|i| format!("rust_pairs-io-{i}"))
        .build()
        .map_err(|e| Error::Config(format!("--io-threads: {e}")))?;
    let mut clock = StageClock::new();
    // Whether any record read an image file (else the scratch blob holds only embedded bytes).
    let mut image_files = false;
    // Stage 1: validate and spill by image.
    let mut spill: Spill<Record> = Spill::new(&spill_dir, "records", nb, cfg.spill_bucket_bytes)?;
    let blob_path = spill_dir.join("images.bin");
    let mut blob = BufWriter::with_capacity(4 << 20, File::create(&blob_path).map_err(|e| Error::output(&blob_path, e))?);
    let mut blob_len = 0u64;
    let video_blob_path = spill_dir.join("videos.bin");
    let video_blob = VideoBlob::create(&video_blob_path).map_err(|e| Error::output(&video_blob_path, e))?;
    let pb = progress(cfg, total_bytes, "validate");
    for input in &files {
        let format = match cfg.format {
            Format::Auto => detect_layout(input, cfg)?,
            f => Some(f),
        };
        let image_root = match (&input.image_root, &cfg.image_root) {
            (Some(r), _) => r.clone(),
            (None, Some(r)) => PathBuf::from(r),
            (None, None) => input.path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let fc = FileCtx {
            label: input.label.clone(),
            format: format.unwrap_or(Format::Auto),
            aspects: cfg.aspects_for(format.unwrap_or(Format::Auto)),
            rating_scale: cfg.rating_scale_for(format.unwrap_or(Format::Auto)),
            image_root,
            cfg,
            videos: &video_blob,
            cancel,
        };
        per_file.insert(
            input.label.clone(),
            FileCounts { file: input.label.clone(), container: input.kind.name().into(), layout: format.map(|f| f.name().to_string()), ..Default::default() },
        );
        let mut chunks = container::open(input, cfg.max_record_bytes)?;
        let mut last_bytes = 0u64;
        // Pipeline: while chunk k is validated (in parallel), chunk k-1 is accounted for (blob,
        // spill, rejects) and chunk k+1 is read, on one thread: decoding a container (Parquet
        // pages above all) is sequential, so it must not wait for the validation.
        let mut pending: Option<(Vec<Line>, u64)> = None;
        let mut next = chunks.next_chunk(CHUNK_LINES)?;
        loop {
            let chunk = std::mem::take(&mut next);
            let at_end = chunk.is_empty();
            let reads_files = !chunk.iter().all(|it| matches!(&it.body, Body::Row(r) if !r.blobs.is_empty()));
            image_files |= reads_files;
            let read = chunks.bytes_read() - last_bytes;
            last_bytes = chunks.bytes_read();
            let (accounted, validated) = rayon::join(
                || -> Result<()> {
                    if !at_end {
                        next = chunks.next_chunk(CHUNK_LINES)?;
                    }
                    let Some((results, read)) = pending.take() else { return Ok(()) };
                    let mut kept = Vec::new();
                    for r in results {
                        match r {
                            Line::Blank => counts.blank_lines += 1,
                            Line::OtherPartition => counts.records_other_partitions += 1,
                            Line::Rejected(rs) => {
                                counts.records_in += 1;
                                counts.records_rejected += 1;
                                let fcnt = per_file.get_mut(&fc.label).expect("file registered");
                                fcnt.records_in += 1;
                                fcnt.records_rejected += 1;
                                counts.responses_rejected += rs.iter().filter(|r| r.kind == crate::record::RejectKind::Response).count() as u64;
                                write_rejects(&rs, &mut rejects);
                            }
                            Line::Kept(mut rec, rs, images) => {
                                counts.records_in += 1;
                                per_file.get_mut(&fc.label).expect("file registered").records_in += 1;
                                counts.responses_rejected += rs.len() as u64;
                                write_rejects(&rs, &mut rejects);
                                for (im, bytes) in rec.images.iter_mut().zip(&images) {
                                    im.offset = blob_len;
                                    blob.write_all(bytes).map_err(|e| Error::output(&blob_path, e))?;
                                    blob_len += bytes.len() as u64;
                                }
                                kept.push((bucket_key(&rec, cfg), *rec));
                            }
                            Line::Fatal(e) => return Err(e),
                        }
                    }
                    spill.put_many(kept)?;
                    rejects_file.write_all(&rejects).map_err(|e| Error::output(&rejects_tmp, e))?;
                    rejects.clear();
                    pb.inc(read);
                    Ok(())
                },
                // Validation reads one image file per record: run it on the wider I/O pool so
                // that many reads are in flight (small-file reads are latency-bound). Rows that
                // carry their images (Parquet) read no file: the I/O pool's extra threads would
                // only spin (a fifth of such a build's CPU), so they stay on the build's pool.
                || {
                    let validate = || chunk.into_par_iter().map(|item| validate_item(item, &fc)).collect::<Vec<Line>>();
                    if reads_files { io_pool.install(validate) } else { validate() }
                },
            );
            accounted?;
            stop()?;
            if at_end {
                break;
            }
            pending = Some((validated, read));
        }
    }
    pb.finish_and_clear();
    spill.finish()?;
    blob.flush().map_err(|e| Error::output(&blob_path, e))?;
    drop(blob);
    if timings {
        clock.lap("validate");
    }

    // Stage 2: group, rank, select (groups in parallel); write or spill the samples.
    let w = Weights::new(cfg);
    let mut stats = Stats::default();
    // Without near-duplicate merging the record buckets are ranges of the samples' shuffle keys
    // (`bucket_key`), so each bucket's samples go straight to the shards; with it they are keyed
    // by image, and the samples are spilled again by shuffle key for stage 3.
    let mut samples: Option<Spill<Finished>> = match cfg.near_dup_threshold {
        None => None,
        Some(_) => {
            // Samples are about as many and as large as the records they come from.
            let nb_samples = buckets_for(spill.len(), spill.bytes(), cfg.spill_bucket_bytes).max(nb);
            Some(Spill::new(&spill_dir, "samples", nb_samples, cfg.spill_bucket_bytes)?)
        }
    };
    let mut writer = SampleWriter::new(cfg, &out, &suffix, &outdir, &blob_path, &video_blob_path, image_files.then_some(&io_pool))?;
    let pb = progress(cfg, spill.len(), "rank");
    while let Some(records) = spill.next_bucket()? {
        stop()?;
        let n_records = records.len() as u64;
        let groups = group(records, cfg.near_dup_threshold, cfg.dedup_mode());
        type FileDelta<'a> = BTreeMap<&'a str, [u64; 3]>; // used, deduplicated, rejected
        let results: Vec<(Vec<Finished>, Vec<Reject>, Counts, Stats, FileDelta)> = groups
            .par_chunks(256)
            .map(|chunk| {
                let mut fd = FileDelta::new();
                let mut c = Counts::default();
                let mut s = Stats::default();
                let mut fin = Vec::new();
                let mut rej = Vec::new();
                for g in chunk {
                    if cancel.load(Ordering::Relaxed) {
                        break; // the bucket's results are discarded by the check after it
                    }
                    match rank_group(g, cfg, &w, &mut c, &mut s) {
                        Ranked::Sample(f) => {
                            c.records_used += 1;
                            c.videos += g.videos.len() as u64;
                            c.video_bytes += g.videos.iter().map(VideoRef::bytes).sum::<u64>();
                            c.records_deduplicated += g.sources.len() as u64 - 1;
                            for (k, src) in g.sources.iter().enumerate() {
                                fd.entry(src.file.as_str()).or_default()[if k == 0 { 0 } else { 1 }] += 1;
                            }
                            c.groups += 1;
                            c.pairs += f.pairs;
                            if f.val {
                                c.groups_val += 1;
                                c.pairs_val += f.pairs;
                            } else {
                                c.groups_train += 1;
                                c.pairs_train += f.pairs;
                            }
                            fin.push(f);
                        }
                        Ranked::Dropped(field, why) => {
                            c.records_rejected += g.sources.len() as u64;
                            for src in &g.sources {
                                fd.entry(src.file.as_str()).or_default()[2] += 1;
                            }
                            rej.extend(g.sources.iter().map(|s| Reject::record(s, field, why.clone())));
                        }
                    }
                }
                (fin, rej, c, s, fd)
            })
            .collect();
        for (_, _, _, _, fd) in &results {
            for (file, [used, dedup, rejected]) in fd {
                if let Some(f) = per_file.get_mut(*file) {
                    f.records_used += used;
                    f.records_deduplicated += dedup;
                    f.records_rejected += rejected;
                }
            }
        }
        let mut finished = Vec::new();
        for (fin, rej, c, s, _) in results {
            counts.add(&c);
            stats.merge(&s);
            write_rejects(&rej, &mut rejects);
            finished.extend(fin);
        }
        // Freeing ~10 allocations a response is worth a thread while the samples are written.
        let (_, written) = rayon::join(
            || groups.into_par_iter().for_each(drop),
            || match &mut samples {
                Some(spill) => spill.put_many(finished.into_iter().map(|f| (f.order, f)).collect()),
                None => writer.write_bucket(finished, &stop),
            },
        );
        written?;
        rejects_file.write_all(&rejects).map_err(|e| Error::output(&rejects_tmp, e))?;
        rejects.clear();
        pb.inc(n_records);
    }
    pb.finish_and_clear();
    if let Some(spill) = &mut samples {
        spill.finish()?;
    }
    if timings {
        clock.lap(if samples.is_none() { "rank+write" } else { "rank" });
    }

    // Stage 3 (after stage 2 when near-duplicate merging keyed the buckets by image): write the
    // spilled samples, bucket by bucket in shuffle order.
    if let Some(mut samples) = samples {
        writer.pb = progress(cfg, counts.groups, "write");
        while let Some(items) = samples.next_bucket()? {
            writer.write_bucket(items, &stop)?;
        }
    }
    writer.pb.finish_and_clear();
    let SampleWriter { train, val, .. } = writer;
    let mut shards = train.finish()?;
    shards.extend(val.finish()?);
    if timings {
        clock.lap("write");
    }

    rejects_file.flush().map_err(|e| Error::output(&rejects_tmp, e))?;
    rejects_file.get_ref().sync_all().map_err(|e| Error::output(&rejects_tmp, e))?;
    drop(rejects_file);
    std::fs::rename(&rejects_tmp, &rejects_path).map_err(|e| Error::output(&rejects_path, e))?;
    let keep: Vec<String> = shards.iter().map(|s| s.path.clone()).chain([rejects_name.clone(), report_name.clone(), manifest_name.clone()]).collect();
    outdir.remove_stale(&keep)?;
    std::fs::remove_dir_all(&spill_dir).map_err(|e| Error::output(&spill_dir, e))?;

    debug_assert!(counts.balanced());
    let counts_json = serde_json::to_value(&counts).unwrap();
    let report = stats.to_report(cfg.bt_prior, &counts_json);
    write_atomic(&out.join(&report_name), serde_json::to_string_pretty(&report).unwrap().as_bytes())?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tool: format!("vpa-shard {}", env!("CARGO_PKG_VERSION")),
        partition: cfg.partition,
        config: config_json(cfg),
        counts,
        shards,
        rejects: rejects_path.file_name().unwrap().to_string_lossy().to_string(),
        report: report_name,
        merged_from: vec![],
        files: per_file.into_values().collect(),
    };
    // The manifest goes last: its presence means the build completed.
    write_atomic(&out.join(&manifest_name), manifest.to_json().as_bytes())?;
    Arc::try_unwrap(outdir).ok().expect("shard writers are finished").finish()?;
    Ok(manifest)
}


#[cfg(test)]
mod tests {
    use super::*;

    fn img(sha: &str) -> ImageRef {
        ImageRef { path: String::new(), sha256: sha.into(), ext: "png".into(), offset: 0, len: 0 }
    }

    #[test]
    fn split_keeps_every_image_on_one_side() {
        // Find a held-out and a training image at val_fraction 0.5.
        let shas: Vec<String> = (0..64).map(|i| format!("{i:064x}")).collect();
        let val = shas.iter().find(|s| is_val(s, 0.5)).unwrap();
        let train = shas.iter().find(|s| !is_val(s, 0.5)).unwrap();
        assert_eq!(split_of(&[img(val)], &[], "a", 0.5), Ok(true));
        assert_eq!(split_of(&[img(train)], &[], "a", 0.5), Ok(false));
        let val2 = shas.iter().filter(|s| is_val(s, 0.5)).nth(1).unwrap();
        assert_eq!(split_of(&[img(val), img(val2)], &[], "a", 0.5), Ok(true));
        assert!(split_of(&[img(val), img(train)], &[], "a", 0.5).unwrap_err().contains("both sides"));
        assert_eq!(split_of(&[img(val), img(train)], &[], "a", 0.0), Ok(false));
        // Text-only: by its anchor, deterministic.
        assert_eq!(split_of(&[], &[], "text\0q", 0.5), Ok(is_val("text\0q", 0.5)));
        // A video is a unit of the split like an image: a sample lies wholly on one side.
        let vid = |sha: &str| VideoRef { path: String::new(), sha256: sha.into(), kind: VideoKind::File { ext: "mp4".into(), offset: 0, len: 0 } };
        assert_eq!(split_of(&[], &[vid(val)], "a", 0.5), Ok(true));
        assert_eq!(split_of(&[img(val)], &[vid(val2)], "a", 0.5), Ok(true));
        assert!(split_of(&[img(val)], &[vid(train)], "a", 0.5).unwrap_err().contains("images and 1 videos fall on both sides"));
    }

    #[test]
    fn preference_cycles_are_found() {
        assert_eq!(preference_cycle(2, &[(0, 1)]), None);
        assert_eq!(preference_cycle(3, &[(0, 1), (1, 2), (0, 2)]), None);
        assert_eq!(preference_cycle(2, &[(0, 1), (1, 0)]), Some(vec![0, 1, 0]));
        assert_eq!(preference_cycle(4, &[(3, 0), (0, 1), (1, 2), (2, 0)]), Some(vec![0, 1, 2, 0]));
    }
}
