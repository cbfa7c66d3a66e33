//! Deduplication: records with the same image content and normalised prompt form one group.
//!
//! Responses are pooled; responses whose normalised texts are identical collapse into one
//! (scores averaged per aspect). With a near-duplicate threshold, prompts on the same image whose
//! word-shingle Jaccard similarity (estimated by MinHash, banded LSH, then verified exactly) reaches
//! the threshold also merge. Groups never span two images, so a partition by image hash keeps
//! global dedup.

use crate::config::Dedup;
use crate::image::sha256_hex;
use crate::record::{ImageRef, Record, RefLogps, Response, Source, VideoRef};
use crate::text::response_key;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A deduplicated group: one image + prompt with all its distinct responses.
#[derive(Debug, Clone)]
pub struct Group {
    pub key: String,
    pub prompt: String,
    /// The images of the group's first record (all its records have the same image list).
    pub images: Vec<ImageRef>,
    /// Where they sit in `prompt`: the first record's, with its prompt (a merged record that
    /// placed them elsewhere in an otherwise equal prompt merges all the same).
    pub image_at: Vec<usize>,
    /// The videos of the group's first record, and where they sit in `prompt`.
    pub videos: Vec<VideoRef>,
    pub video_at: Vec<usize>,
    /// See [`crate::record::media_key`]; `""` for a text-only group.
    pub image_key: String,
    pub responses: Vec<Response>,
    /// (chosen, rejected) over `responses`, one entry per source comparison.
    pub explicit_pairs: Vec<(usize, usize)>,
    /// Shipped reference log-probs of each explicit pair (same order), with their record.
    pub pair_ref_logps: Vec<Option<(RefLogps, Source)>>,
    /// Explicit pairs whose two sides collapsed into one response.
    pub identical_pairs: u64,
    pub sources: Vec<Source>,
    /// Responses that collapsed into an earlier identical one.
    pub collapsed: u64,
    /// Distinct normalised prompts merged into this group by near-duplicate detection (beyond the first).
    pub near_dup_merged: u64,
}

/// Deterministic sample key: 20 hex digits of sha256(image key, normalised prompt); no dots.
pub fn group_key(image_key: &str, prompt_norm: &str) -> String {
    let mut s = String::with_capacity(image_key.len() + 1 + prompt_norm.len());
    s.push_str(image_key);
    s.push('\0');
    s.push_str(prompt_norm);
    sha256_hex(s.as_bytes())[..20].to_string()
}

/// Group records. Output is sorted by key; sources inside a group are in (file, line) order.
pub fn group(records: Vec<Record>, near_dup: Option<f64>, mode: Dedup) -> Vec<Group> {
    // Canonical normalised prompt per (image, prompt): its near-duplicate cluster's smallest member.
    let canonical: HashMap<(&str, &str), String> = match near_dup {
        None => HashMap::new(),
        Some(t) => {
            let mut by_image: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            // Text-only records are bucketed by their prompt, so near-duplicates among them could
            // sit in other buckets: near-dup merging applies to records with images only.
            for r in records.iter().filter(|r| !r.image_key.is_empty()) {
                by_image.entry(&r.image_key).or_default().insert(&r.prompt_norm);
            }
            let mut map = HashMap::new();
            for (img, prompts) in by_image {
                let prompts: Vec<&str> = prompts.into_iter().collect();
                if prompts.len() < 2 {
                    continue;
                }
                for (p, c) in near_duplicate_clusters(&prompts, t) {
                    map.insert((img, prompts[p]), c);
                }
            }
            map
        }
    };
    let keys: Vec<String> = records
        .par_iter()
        .map(|r| {
            let canon = canonical.get(&(r.image_key.as_str(), r.prompt_norm.as_str())).map_or(r.prompt_norm.as_str(), String::as_str);
            group_key(&r.image_key, canon)
        })
        .collect();
    drop(canonical);
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.par_sort_unstable_by(|&a, &b| (&keys[a], &records[a].source).cmp(&(&keys[b], &records[b].source)));
    let mut slots: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    let mut runs: Vec<(String, Vec<Record>)> = Vec::new();
    for i in order {
        let rec = slots[i].take().expect("each record is grouped once");
        match runs.last_mut() {
            Some((k, recs)) if *k == keys[i] => recs.push(rec),
            _ => runs.push((keys[i].clone(), vec![rec])),
        }
    }
    runs.into_par_iter().map(|(key, recs)| merge(key, recs, mode)).collect()
}

fn merge(key: String, recs: Vec<Record>, mode: Dedup) -> Group {
    let first = &recs[0];
    let mut g = Group {
        key,
        prompt: first.prompt.clone(),
        images: first.images.clone(),
        image_at: first.image_at.clone(),
        videos: first.videos.clone(),
        video_at: first.video_at.clone(),
        image_key: first.image_key.clone(),
        responses: vec![],
        explicit_pairs: vec![],
        pair_ref_logps: vec![],
        identical_pairs: 0,
        sources: vec![],
        collapsed: 0,
        near_dup_merged: recs.iter().map(|r| &r.prompt_norm).collect::<BTreeSet<_>>().len() as u64 - 1,
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    // Per merged response, per aspect: (sum, count) to average collapsed duplicates.
    let mut sums: Vec<BTreeMap<String, (f64, f64)>> = vec![];
    for rec in recs {
        let mut map = Vec::with_capacity(rec.responses.len());
        for Response { text, model, scores } in rec.responses {
            let norm = response_key(&text, mode);
            let at = match index.get(&norm) {
                Some(&i) => {
                    g.collapsed += 1;
                    if g.responses[i].model.is_none() {
                        g.responses[i].model = model;
                    }
                    i
                }
                None => {
                    index.insert(norm, g.responses.len());
                    sums.push(BTreeMap::new());
                    g.responses.push(Response { text, model, scores: BTreeMap::new() });
                    g.responses.len() - 1
                }
            };
            for (a, s) in scores {
                let e = sums[at].entry(a).or_insert((0.0, 0.0));
                e.0 += s;
                e.1 += 1.0;
            }
            map.push(at);
        }
        let mut refs = rec.pair_ref_logps.into_iter();
        for (c, r) in rec.explicit_pairs {
            let (c, r) = (map[c], map[r]);
            let lp = refs.next().flatten();
            if c == r {
                g.identical_pairs += 1;
            } else {
                g.explicit_pairs.push((c, r));
                g.pair_ref_logps.push(lp.map(|lp| (lp, rec.source.clone())));
            }
        }
        g.sources.push(rec.source);
    }
    for (resp, s) in g.responses.iter_mut().zip(sums) {
        resp.scores = s.into_iter().map(|(a, (sum, n))| (a, sum / n)).collect();
    }
    g
}

fn shingles(s: &str) -> BTreeSet<String> {
    let words: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
    if words.len() < 3 {
        return std::iter::once(words.join(" ")).collect();
    }
    words.windows(3).map(|w| w.join(" ")).collect()
}

fn jaccard(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let inter = a.intersection(b).count() as f64;
    let union = (a.len() + b.len()) as f64 - inter;
    if union == 0.0 { 1.0 } else { inter / union }
}

const MINHASH_BANDS: usize = 16;
const MINHASH_ROWS: usize = 4;

fn minhash(sh: &BTreeSet<String>) -> Vec<u64> {
    let hashes: Vec<u64> = sh.iter().map(|s| fnv1a(s.as_bytes())).collect();
    (0..MINHASH_BANDS * MINHASH_ROWS as usize)
        .map(|k| {
            let (a, b) = (splitmix(k as u64 * 2 + 1) | 1, splitmix(k as u64 * 2 + 2));
            hashes.iter().map(|h| h.wrapping_mul(a).wrapping_add(b)).min().unwrap_or(0)
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Map each prompt (by index) to the smallest member of its near-duplicate cluster (single
/// linkage). `prompts` must be sorted; LSH proposes candidates, an exact Jaccard check confirms.
fn near_duplicate_clusters(prompts: &[&str], threshold: f64) -> Vec<(usize, String)> {
    let sh: Vec<BTreeSet<String>> = prompts.iter().map(|p| shingles(p)).collect();
    let sigs: Vec<Vec<u64>> = sh.iter().map(minhash).collect();
    let mut parent: Vec<usize> = (0..prompts.len()).collect();
    fn find(p: &mut Vec<usize>, x: usize) -> usize {
        let mut r = x;
        while p[r] != r {
            r = p[r];
        }
        p[x] = r;
        r
    }
    for band in 0..MINHASH_BANDS {
        let mut buckets: HashMap<&[u64], Vec<usize>> = HashMap::new();
        for (i, s) in sigs.iter().enumerate() {
            buckets.entry(&s[band * MINHASH_ROWS..(band + 1) * MINHASH_ROWS]).or_default().push(i);
        }
        for members in buckets.values() {
            for (x, &i) in members.iter().enumerate() {
                for &j in &members[x + 1..] {
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    if ri != rj && jaccard(&sh[i], &sh[j]) >= threshold {
                        // The root is the smaller index, i.e. the lexicographically smallest prompt.
                        let (lo, hi) = if ri < rj { (ri, rj) } else { (rj, ri) };
                        parent[hi] = lo;
                    }
                }
            }
        }
    }
    (0..prompts.len()).map(|i| (i, prompts[find(&mut parent, i)].to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{normalize, prompt_key};

    fn rec(file: &str, line: u64, img: &str, prompt: &str, texts: &[(&str, f64)], pairs: &[(usize, usize)]) -> Record {
        Record {
            source: Source::line(file, line),
            prompt: prompt.into(),
            prompt_norm: normalize(prompt),
            images: vec![ImageRef { path: format!("/{img}.png"), sha256: img.into(), ext: "png".into(), offset: 0, len: 0 }],
            image_at: vec![0],
            videos: vec![],
            video_at: vec![],
            image_key: img.into(),
            responses: texts
                .iter()
                .map(|(t, s)| Response { text: t.to_string(), model: None, scores: [("h".to_string(), *s)].into() })
                .collect(),
            explicit_pairs: pairs.to_vec(),
            pair_ref_logps: vec![],
        }
    }

    #[test]
    fn same_image_and_prompt_merge_and_identical_texts_collapse() {
        let recs = vec![
            rec("b", 1, "img1", "What is it?", &[("A cat.", 4.0), ("A dog.", 2.0)], &[]),
            rec("a", 7, "img1", "what  is IT?", &[("a cat.", 2.0), ("A bird.", 1.0)], &[]),
            rec("a", 2, "img2", "What is it?", &[("A cat.", 5.0)], &[]),
        ];
        let gs = group(recs, None, Dedup::Normalized);
        assert_eq!(gs.len(), 2);
        let g = gs.iter().find(|g| g.image_key == "img1").unwrap();
        assert_eq!(g.sources, vec![Source::line("a", 7), Source::line("b", 1)]);
        // First source (a:7) fixes the stored prompt and response order.
        assert_eq!(g.prompt, "what  is IT?");
        let texts: Vec<&str> = g.responses.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, vec!["a cat.", "A bird.", "A dog."]);
        assert_eq!(g.responses[0].scores["h"], 3.0);
        assert_eq!(g.collapsed, 1);
        assert_eq!(g.key, group_key("img1", "what is it?"));
        assert!(!g.key.contains('.'));
    }

    #[test]
    fn identical_explicit_pairs_are_counted() {
        let gs = group(vec![rec("a", 1, "i", "Q", &[("Yes.", 0.0), ("yes.", 0.0)], &[(0, 1)])], None, Dedup::Normalized);
        assert_eq!(gs[0].identical_pairs, 1);
        assert!(gs[0].explicit_pairs.is_empty());
    }

    #[test]
    fn near_duplicates_merge_only_when_enabled_and_same_image() {
        let p1 = "describe the red square in the middle of this image please";
        let p2 = "describe the red square in the middle of this image please now";
        let p3 = "how many circles can you count here";
        let recs = || vec![
            rec("a", 1, "i", p1, &[("x", 1.0), ("y", 2.0)], &[]),
            rec("a", 2, "i", p2, &[("z", 1.0)], &[]),
            rec("a", 3, "i", p3, &[("w", 1.0)], &[]),
            rec("a", 4, "j", p2, &[("v", 1.0)], &[]),
        ];
        assert_eq!(group(recs(), None, Dedup::Normalized).len(), 4);
        let gs = group(recs(), Some(0.7), Dedup::Normalized);
        assert_eq!(gs.len(), 3);
        let merged = gs.iter().find(|g| g.sources.len() == 2).unwrap();
        assert_eq!(merged.key, group_key("i", p1));
        assert_eq!(merged.near_dup_merged, 1);
        assert_eq!(merged.responses.len(), 3);
    }

    #[test]
    fn exact_mode_keeps_case_and_merges_only_exact_duplicates() {
        let mk = |line, prompt: &str, texts: &[(&str, f64)]| {
            let mut r = rec("a", line, "img1", prompt, texts, &[]);
            r.prompt_norm = prompt_key(prompt, Dedup::Exact);
            r
        };
        let recs = vec![
            mk(1, "<image>\nWhat is it?", &[("Yes.", 5.0), (" No. ", 1.0)]),
            mk(2, "What  is it?", &[("yes.", 2.0), ("No.", 3.0)]),
            mk(3, "what is it?", &[("Yes.", 4.0)]),
        ];
        let gs = group(recs, None, Dedup::Exact);
        assert_eq!(gs.len(), 2, "a prompt differing in case is another prompt");
        let g = gs.iter().find(|g| g.sources.len() == 2).unwrap();
        let texts: Vec<(&str, f64)> = g.responses.iter().map(|r| (r.text.as_str(), r.scores["h"])).collect();
        // "Yes." and "yes." stay apart; " No. " and "No." are the same answer (scores averaged).
        assert_eq!(texts, vec![("Yes.", 5.0), (" No. ", 2.0), ("yes.", 2.0)]);
    }
}
