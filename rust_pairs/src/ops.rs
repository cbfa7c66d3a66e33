//! Operations on finished outputs: `inspect` (verify shards against the manifest) and `merge`
//! (join partition builds into one manifest, rejects file and report).

use crate::error::{Error, Result};
use crate::manifest::{manifests_in, relative_to, sum_files, Counts, Manifest, FORMAT_VERSION};
use crate::report::Stats;
use crate::shard::{file_sha256, write_atomic};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Members of one sample seen so far: name suffixes (after `{key}.`) and its JSON.
struct Seen {
    key: String,
    members: Vec<String>,
    json: Option<Value>,
}

/// A sample is whole when it has its JSON and exactly the image and video members the JSON lists.
fn close(cur: Option<Seen>, problems: &mut Vec<String>) {
    let Some(s) = cur else { return };
    let Some(js) = &s.json else {
        problems.push(format!("sample {} lacks its json", s.key));
        return;
    };
    let images: Vec<String> = js["images"].as_array().map_or_else(Vec::new, |a| a.iter().filter_map(|i| i["member"].as_str().map(String::from)).collect());
    let videos = js["videos"].as_array().cloned().unwrap_or_default();
    let mut want: Vec<String> = images.clone();
    want.extend(videos.iter().flat_map(|v| v["members"].as_array().cloned().unwrap_or_default()).filter_map(|m| m.as_str().map(String::from)));
    let mut have: Vec<String> = s.members.into_iter().filter(|m| m != "json").collect();
    want.sort();
    have.sort();
    if want != have {
        problems.push(format!("sample {} has members {have:?}, its json lists {want:?}", s.key));
    }
    // Offsets (absent in older shards) place each image and video in the prompt: chars, non-decreasing per kind.
    let len = js["prompt"].as_str().map_or(0, |p| p.chars().count()) as u64;
    for (what, entries) in [("image", js["images"].as_array().cloned().unwrap_or_default()), ("video", videos)] {
        let offsets: Vec<&Value> = entries.iter().map(|i| &i["offset"]).filter(|o| !o.is_null()).collect();
        if offsets.is_empty() {
            continue;
        }
        let at: Vec<Option<u64>> = offsets.iter().map(|o| o.as_u64()).collect();
        let ok = offsets.len() == entries.len() && at.iter().all(|o| o.is_some_and(|o| o <= len)) && at.windows(2).all(|w| w[0] <= w[1]);
        if !ok {
            problems.push(format!("sample {}: {what} offsets {offsets:?} do not place its {} {what}s in a prompt of {len} chars", s.key, entries.len()));
        }
    }
}

/// Walk one shard: samples (consecutive members sharing a key), pairs, and structural problems.
fn walk(path: &Path) -> std::io::Result<(u64, u64, Vec<String>, Option<Value>)> {
    let mut ar = tar::Archive::new(BufReader::new(File::open(path)?));
    let (mut samples, mut pairs, mut problems, mut first) = (0u64, 0u64, Vec::new(), None);
    let mut current: Option<Seen> = None;
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().to_string();
        let (key, ext) = name.split_once('.').map(|(k, x)| (k.to_string(), x.to_string())).unwrap_or((name.clone(), String::new()));
        if current.as_ref().map(|c| &c.key) != Some(&key) {
            close(current.take(), &mut problems);
            current = Some(Seen { key: key.clone(), members: vec![], json: None });
            samples += 1;
        }
        let cur = current.as_mut().unwrap();
        if ext == "json" {
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            match serde_json::from_slice::<Value>(&data) {
                Ok(v) => {
                    pairs += v["pairs"].as_array().map_or(0, |a| a.len() as u64);
                    if first.is_none() {
                        first = Some(v.clone());
                    }
                    cur.json = Some(v);
                }
                Err(err) => problems.push(format!("{name}: malformed JSON: {err}")),
            }
        }
        cur.members.push(ext);
    }
    close(current, &mut problems);
    Ok((samples, pairs, problems, first))
}

/// Check every shard of a finished build against its manifest.
pub fn inspect(dir: &Path, verify_hashes: bool) -> Result<Value> {
    let mpath = dir.join("manifest.json");
    if !mpath.exists() && !manifests_in(dir)?.is_empty() {
        return Err(Error::Manifest(format!(
            "{} holds partition manifests but no manifest.json: run `vpa-shard merge` first",
            dir.display()
        )));
    }
    let m = Manifest::load(&mpath)?;
    let mut rows = Vec::new();
    let mut all_ok = m.counts.balanced();
    let (mut tot_samples, mut tot_pairs) = (0, 0);
    let mut example = None;
    for s in &m.shards {
        let p = dir.join(&s.path);
        let mut problems = Vec::new();
        let (mut samples, mut pairs) = (0, 0);
        if !p.exists() {
            problems.push("missing".to_string());
        } else {
            if verify_hashes {
                match file_sha256(&p) {
                    Ok((sha, n)) => {
                        if sha != s.sha256 {
                            problems.push(format!("sha256 {sha} differs from the manifest's"));
                        }
                        if n != s.bytes {
                            problems.push(format!("{n} bytes, manifest says {}", s.bytes));
                        }
                    }
                    Err(e) => problems.push(format!("unreadable: {e}")),
                }
            }
            match walk(&p) {
                Ok((n, np, pr, first)) => {
                    samples = n;
                    pairs = np;
                    problems.extend(pr);
                    if example.is_none() {
                        example = first;
                    }
                }
                Err(e) => problems.push(format!("not a readable tar: {e}")),
            }
            if samples != s.samples {
                problems.push(format!("{samples} samples, manifest says {}", s.samples));
            }
            if pairs != s.pairs {
                problems.push(format!("{pairs} pairs, manifest says {}", s.pairs));
            }
        }
        all_ok &= problems.is_empty();
        tot_samples += samples;
        tot_pairs += pairs;
        rows.push(json!({"path": s.path, "split": s.split, "samples": samples, "pairs": pairs, "bytes": s.bytes, "ok": problems.is_empty(), "problems": problems}));
    }
    all_ok &= tot_samples == m.counts.groups && tot_pairs == m.counts.pairs;
    Ok(json!({
        "dir": dir.to_string_lossy(),
        "ok": all_ok,
        "balanced": m.counts.balanced(),
        "counts": m.counts,
        "samples_found": tot_samples,
        "pairs_found": tot_pairs,
        "shards": rows,
        "example": example,
    }))
}

/// Join partition builds (each DIR holds one or more `manifest-p*.json`) into `out`.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Manifest> {
    let mut parts: Vec<(PathBuf, Manifest)> = Vec::new();
    for d in dirs {
        let found = manifests_in(d)?;
        if found.is_empty() {
            return Err(Error::Manifest(format!("{} holds no manifest", d.display())));
        }
        for p in found {
            let m = Manifest::load(&p)?;
            // Only partition manifests are parts; a single build or an earlier merge is not.
            if m.partition.1 > 1 && m.merged_from.is_empty() {
                parts.push((d.clone(), m));
            }
        }
    }
    if parts.is_empty() {
        return Err(Error::Manifest("no partition manifest found to merge".into()));
    }
    parts.sort_by_key(|(_, m)| m.partition);
    let n = parts[0].1.partition.1;
    let indices: BTreeSet<u64> = parts.iter().map(|(_, m)| m.partition.0).collect();
    if parts.iter().any(|(_, m)| m.partition.1 != n) {
        return Err(Error::Manifest("partitions disagree on N (the /N of --partition i/N)".into()));
    }
    if indices.len() != parts.len() {
        return Err(Error::Manifest("the same partition appears twice".into()));
    }
    let missing: Vec<u64> = (0..n).filter(|i| !indices.contains(i)).collect();
    if !missing.is_empty() {
        return Err(Error::Manifest(format!("partitions {missing:?} of {n} are missing")));
    }
    let config = parts[0].1.config.clone();
    if let Some((d, m)) = parts.iter().find(|(_, m)| m.config != config) {
        return Err(Error::Manifest(format!(
            "partition {}/{} in {} was built with different options",
            m.partition.0, n, d.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::output(out, e))?;
    let mut counts = Counts::default();
    let mut shards = Vec::new();
    let mut stats = Stats::default();
    let mut rejects = Vec::new();
    let mut merged_from = Vec::new();
    for (d, m) in &parts {
        counts.add(&m.counts);
        for s in &m.shards {
            let mut s = s.clone();
            s.path = relative_to(&d.join(&s.path), out).to_string_lossy().to_string();
            shards.push(s);
        }
        let report_path = d.join(&m.report);
        let report: Value = serde_json::from_slice(&std::fs::read(&report_path).map_err(|e| Error::input(&report_path, e))?)
            .map_err(|e| Error::Manifest(format!("report {} is malformed: {e}", report_path.display())))?;
        let part_stats: Stats = serde_json::from_value(report["stats"].clone())
            .map_err(|e| Error::Manifest(format!("report {} has no usable stats: {e}", report_path.display())))?;
        stats.merge(&part_stats);
        let rp = d.join(&m.rejects);
        File::open(&rp).and_then(|mut f| f.read_to_end(&mut rejects)).map_err(|e| Error::input(&rp, e))?;
        merged_from.push(relative_to(&d.join(format!("manifest-p{:04}of{:04}.json", m.partition.0, n)), out).to_string_lossy().to_string());
    }
    // Records of other partitions were seen by every part; after merging they are all owned.
    counts.records_other_partitions = 0;
    let prior = config["bt_prior"].as_f64().unwrap_or(0.1);
    let report = stats.to_report(prior, &serde_json::to_value(&counts).unwrap());
    write_atomic(&out.join("report.json"), serde_json::to_string_pretty(&report).unwrap().as_bytes())?;
    write_atomic(&out.join("rejects.jsonl"), &rejects)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tool: format!("vpa-shard {}", env!("CARGO_PKG_VERSION")),
        partition: (0, 1),
        config,
        counts,
        shards,
        rejects: "rejects.jsonl".into(),
        report: "report.json".into(),
        merged_from,
        files: sum_files(parts.iter().map(|(_, m)| m.files.as_slice())),
    };
    write_atomic(&out.join("manifest.json"), manifest.to_json().as_bytes())?;
    Ok(manifest)
}
