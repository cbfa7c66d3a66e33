//! `manifest.json`: every shard with its counts, bytes and sha256, and the counts that prove every
//! input record was written, merged as a duplicate or rejected:
//! `records_in = records_used + records_deduplicated + records_rejected`.

use crate::error::{Error, Result};
use crate::shard::ShardInfo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

macro_rules! counts {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Counts { $($(#[doc = $doc])* pub $name: u64,)* }
        impl Counts {
            pub fn add(&mut self, o: &Counts) { $(self.$name += o.$name;)* }
        }
    };
}

counts! {
    /// Records owned by this build (all records for a single build; this partition's share otherwise).
    records_in,
    /// Records that became a written sample (one per group).
    records_used,
    /// Records merged into a written group as duplicates of its first record.
    records_deduplicated,
    /// Records rejected, each with file, line and reason in `rejects.jsonl`.
    records_rejected,
    /// Responses dropped from otherwise valid records (also in `rejects.jsonl`).
    responses_rejected,
    /// Responses that collapsed into an identical response of the same group.
    responses_collapsed,
    /// Prompts merged into another prompt's group as near-duplicates.
    prompts_near_duplicate,
    /// Blank lines (not records).
    blank_lines,
    /// Records that belong to other partitions (read, not counted in `records_in`).
    records_other_partitions,
    groups,
    groups_train,
    groups_val,
    pairs,
    pairs_train,
    pairs_val,
    pairs_dropped_identical,
    pairs_dropped_ties,
    pairs_dropped_margin,
    pairs_dropped_probability,
    /// Explicit pairs whose two directions were both asserted with equal weight.
    pairs_dropped_conflicting,
    /// Pairs whose chosen response came from a model excluded from being chosen.
    pairs_dropped_excluded,
    /// Groups rejected because their pairwise annotations contradict each other (a cycle).
    groups_contradictory,
    /// Videos in the written samples (a file or a frame sequence each).
    videos,
    /// Bytes of those videos (files, or their frames) in the shards.
    video_bytes,
}

impl Counts {
    pub fn balanced(&self) -> bool {
        self.records_in == self.records_used + self.records_deduplicated + self.records_rejected
    }
}

/// 2: a sample holds 0..N images as `{key}.{i}.{ext}` listed in its JSON `images` (1: one `{key}.{ext}`).
/// What one input file gave: its container and layout, and its records in / used (written as a
/// sample) / deduplicated (merged into another record's sample) / rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    pub file: String,
    pub container: String,
    /// The layout detected (or forced with `--format`); `None` when none could be detected.
    pub layout: Option<String>,
    pub records_in: u64,
    pub records_used: u64,
    pub records_deduplicated: u64,
    pub records_rejected: u64,
    /// Why the file was not read at all (a FIFO, socket or device found in a directory input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Per-file counts of several manifests (partitions of one build) summed by file.
pub fn sum_files<'a>(parts: impl IntoIterator<Item = &'a [FileCounts]>) -> Vec<FileCounts> {
    let mut by: std::collections::BTreeMap<String, FileCounts> = std::collections::BTreeMap::new();
    for files in parts {
        for f in files {
            let e = by.entry(f.file.clone()).or_insert_with(|| FileCounts { records_in: 0, records_used: 0, records_deduplicated: 0, records_rejected: 0, ..f.clone() });
            e.records_in += f.records_in;
            e.records_used += f.records_used;
            e.records_deduplicated += f.records_deduplicated;
            e.records_rejected += f.records_rejected;
        }
    }
    by.into_values().collect()
}

pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tool: String,
    /// (index, count); merged manifests keep (0, 1) and list their parts in `merged_from`.
    pub partition: (u64, u64),
    /// The build options (inputs, strategy, aspects, seed, ...).
    pub config: Value,
    pub counts: Counts,
    pub shards: Vec<ShardInfo>,
    pub rejects: String,
    pub report: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Per input file (sorted by file): container, layout, records in / used / deduplicated / rejected.
    #[serde(default)]
    pub files: Vec<FileCounts>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let data = std::fs::read(path).map_err(|e| Error::Manifest(format!("cannot read manifest {}: {e}", path.display())))?;
        let m: Manifest = serde_json::from_slice(&data).map_err(|e| Error::Manifest(format!("manifest {} is malformed: {e}", path.display())))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::Manifest(format!(
                "manifest {} has format_version {}, expected {FORMAT_VERSION}: rebuild it with this vpa-shard",
                path.display(),
                m.format_version
            )));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serialises")
    }
}

/// All manifests in a directory: `manifest.json` and the partitions' `manifest-p*.json`.
pub fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Manifest(format!("cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            n == "manifest.json" || (n.starts_with("manifest-p") && n.ends_with(".json"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `path` relative to `base` (both made absolute), for manifests that point into sibling folders.
pub fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, b) = (abs(path), abs(base));
    let pc: Vec<_> = p.components().collect();
    let bc: Vec<_> = b.components().collect();
    let common = pc.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..bc.len() {
        out.push("..");
    }
    for c in &pc[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_and_balance() {
        let mut a = Counts { records_in: 3, records_used: 1, records_deduplicated: 1, records_rejected: 1, ..Default::default() };
        assert!(a.balanced());
        a.add(&Counts { records_in: 1, ..Default::default() });
        assert!(!a.balanced());
    }

    #[test]
    fn relative_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/p0")).unwrap();
        std::fs::create_dir_all(d.path().join("out")).unwrap();
        std::fs::write(d.path().join("a/p0/x.tar"), b"").unwrap();
        assert_eq!(relative_to(&d.path().join("a/p0/x.tar"), &d.path().join("out")), PathBuf::from("../a/p0/x.tar"));
        assert_eq!(relative_to(&d.path().join("out/y.tar"), &d.path().join("out")), PathBuf::from("y.tar"));
    }
}
