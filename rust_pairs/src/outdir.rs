//! The output directory of a build: an exclusive lock, and the proof of what the build may
//! overwrite or remove.
//!
//! A build writes only into a directory that is empty or holds earlier vpa-shard builds
//! (recognised by a manifest or a journal). Of the files in its own namespace (`train{S}-NNNNNN.tar`,
//! `manifest{S}.json`, ... for partition suffix `S`) it touches only those that the previous
//! build's manifest or an interrupted build's journal lists; any other file there stops the
//! build before anything is written. The journal (`.vpa-shard{S}.journal`) is written before
//! anything else and names every file the build creates before it creates it, so a killed build
//! can be completed by a rerun without guessing. The previous manifest is removed once the
//! journal holds what it listed, so no manifest ever describes shards other than those on disk;
//! the new one is written last.

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Default, Serialize, Deserialize)]
struct Journal {
    /// Names (in the build's namespace) that earlier builds or this one created.
    owned: BTreeSet<String>,
}

/// A claimed output directory; the lock is held until this is dropped.
pub struct OutDir {
    dir: PathBuf,
    suffix: String,
    _lock: File,
    journal: Mutex<Journal>,
}

fn refuse(msg: String) -> Error {
    Error::OutDir(msg)
}

/// `{split}{suffix}-NNNNNN.tar`: exactly six digits, so other partitions' shards never match.
fn is_shard_name(name: &str, suffix: &str) -> bool {
    ["train", "val"].iter().any(|s| {
        name.strip_prefix(&format!("{s}{suffix}-"))
            .and_then(|rest| rest.strip_suffix(".tar"))
            .is_some_and(|d| d.len() == 6 && d.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The names a build of partition suffix `S` may write: its shards, manifest, rejects, report,
/// spill folder, and their `.NAME.partial` files.
struct Namespace<'a>(&'a str);

impl Namespace<'_> {
    fn contains(&self, name: &str) -> bool {
        let s = self.0;
        let base = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")).unwrap_or(name);
        is_shard_name(base, s)
            || base == OutDir::manifest_name(s)
            || base == format!("rejects{s}.jsonl")
            || base == format!("report{s}.json")
            || name == OutDir::spill_name(s)
    }
}

impl OutDir {
    pub fn lock_name(suffix: &str) -> String {
        format!(".vpa-shard{suffix}.lock")
    }
    fn journal_name(&self) -> String {
        format!(".vpa-shard{}.journal", self.suffix)
    }
    pub fn manifest_name(suffix: &str) -> String {
        format!("manifest{suffix}.json")
    }
    pub fn spill_name(suffix: &str) -> String {
        format!(".spill{suffix}")
    }

    /// Lock `dir` for a build of partition suffix `suffix` and check that it may write there.
    /// Fails (without writing anything but the lock file) when another build holds the lock,
    /// when `dir` holds files but no vpa-shard build, or when a file the build would overwrite or
    /// remove is not listed by the previous build.
    pub fn claim(dir: &Path, suffix: &str) -> Result<OutDir> {
        std::fs::create_dir_all(dir).map_err(|e| Error::output(dir, e))?;
        // Check before creating the lock file (a refused directory gets nothing written into
        // it), and again under the lock (another build may have changed it meanwhile).
        Self::owned_files(dir, suffix)?;
        let lock_path = dir.join(Self::lock_name(suffix));
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::output(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(refuse(format!(
                    "--out {}: another vpa-shard build is writing there (it holds {}); wait for it to finish or choose another --out",
                    dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::output(&lock_path, e)),
        }
        let mut owned = Self::owned_files(dir, suffix)?;
        let od = OutDir { dir: dir.to_path_buf(), suffix: suffix.to_string(), _lock: lock, journal: Mutex::new(Journal::default()) };
        owned.insert(Self::spill_name(suffix));
        *od.journal.lock().unwrap() = Journal { owned };
        od.save()?;
        // Invalidate the previous manifest before any shard changes; the journal now lists its files.
        let mpath = dir.join(Self::manifest_name(suffix));
        if mpath.exists() {
            std::fs::remove_file(&mpath).map_err(|e| Error::output(&mpath, e))?;
        }
        Ok(od)
    }

    /// What earlier builds of this namespace own in `dir`; an error when `dir` holds files but
    /// no vpa-shard build, or a file of the namespace that no earlier build owns.
    fn owned_files(dir: &Path, suffix: &str) -> Result<BTreeSet<String>> {
        let ns = Namespace(suffix);
        let names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::output(dir, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().to_string()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::output(dir, e))?;
        let is_lock = |n: &str| n.starts_with(".vpa-shard") && n.ends_with(".lock");
        let is_build = |n: &str| {
            (n.starts_with("manifest") && n.ends_with(".json")) || (n.starts_with(".vpa-shard") && n.ends_with(".journal"))
        };
        if !names.iter().any(|n| is_build(n)) {
            if let Some(other) = names.iter().find(|n| !is_lock(n)) {
                return Err(refuse(format!(
                    "--out {} is not empty ({other} and {} more) and holds no vpa-shard build (no manifest.json): a build writes only \
                     into an empty directory or over an earlier build. Choose a new or empty --out directory, or move the files away",
                    dir.display(),
                    names.iter().filter(|n| !is_lock(n)).count() - 1
                )));
            }
        }
        let mut owned = BTreeSet::new();
        let jpath = dir.join(format!(".vpa-shard{suffix}.journal"));
        if jpath.exists() {
            let j: Journal = std::fs::read(&jpath)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| refuse(format!("--out {}: the journal {} of an interrupted build is unreadable; remove the directory's build files yourself", dir.display(), jpath.display())))?;
            owned.extend(j.owned);
        }
        let mpath = dir.join(Self::manifest_name(suffix));
        if mpath.exists() {
            let m = Manifest::load(&mpath).map_err(|e| refuse(format!("--out {}: {e}; it cannot prove which files an earlier build wrote", dir.display())))?;
            owned.insert(Self::manifest_name(suffix));
            // Only plain names in this namespace: a merged manifest also lists other folders' shards.
            for n in m.shards.iter().map(|s| s.path.clone()).chain([m.rejects, m.report]) {
                if ns.contains(&n) {
                    owned.insert(n);
                }
            }
        }
        for n in &names {
            if !ns.contains(n) {
                continue;
            }
            let base = n.strip_prefix('.').and_then(|b| b.strip_suffix(".partial")).unwrap_or(n);
            if !owned.contains(n) && !owned.contains(base) {
                return Err(refuse(format!(
                    "--out {}: {n} is not listed by the earlier build there (manifest or journal), and a build would overwrite or \
                     remove it. Move it away or choose another --out",
                    dir.display()
                )));
            }
        }
        Ok(owned)
    }

    fn save(&self) -> Result<()> {
        let j = self.journal.lock().unwrap();
        let path = self.dir.join(self.journal_name());
        let tmp = self.dir.join(format!("{}.partial", self.journal_name()));
        (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&*j).expect("journal serialises"))?;
            std::fs::rename(&tmp, &path)
        })()
        .map_err(|e| Error::output(&path, e))
    }

    /// Record that the build is about to create `name` (before it exists on disk).
    pub fn own(&self, name: &str) -> Result<()> {
        if self.journal.lock().unwrap().owned.insert(name.to_string()) {
            self.save()?;
        }
        Ok(())
    }

    /// Remove what earlier builds (or an interrupted one) left that the new build did not
    /// rewrite: only names the journal owns, and their partial files.
    pub fn remove_stale(&self, keep: &[String]) -> Result<()> {
        let owned: Vec<String> = self.journal.lock().unwrap().owned.iter().cloned().collect();
        for n in owned {
            for name in [n.clone(), format!(".{n}.partial")] {
                if keep.contains(&name) || name == Self::spill_name(&self.suffix) {
                    continue;
                }
                let p = self.dir.join(&name);
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => std::fs::remove_file(&p).map_err(|e| Error::output(&p, e))?,
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// An interrupted build: remove every file the journal owns (shards of this build and of
    /// the earlier one, whose manifest is already gone) and the scratch folder; keep the journal
    /// so the directory is still recognised as a build.
    pub fn discard(&self) -> Result<()> {
        self.remove_stale(&[])?;
        let spill = self.dir.join(Self::spill_name(&self.suffix));
        if spill.is_dir() {
            std::fs::remove_dir_all(&spill).map_err(|e| Error::output(&spill, e))?;
        }
        Ok(())
    }

    /// The build completed and its manifest is written: the journal is no longer needed.
    pub fn finish(self) -> Result<()> {
        let p = self.dir.join(self.journal_name());
        std::fs::remove_file(&p).map_err(|e| Error::output(&p, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_per_partition() {
        let ns = Namespace("");
        assert!(ns.contains("train-000001.tar") && ns.contains(".val-000000.tar.partial"));
        assert!(ns.contains("manifest.json") && ns.contains(".spill"));
        assert!(!ns.contains("train-p0000of0002-000000.tar") && !ns.contains("train-1.tar"));
        assert!(!ns.contains("manifest-p0000of0002.json") && !ns.contains("notes.txt"));
        let p = Namespace("-p0001of0002");
        assert!(p.contains("train-p0001of0002-000000.tar") && !p.contains("train-000000.tar"));
    }

    #[test]
    fn refuses_foreign_files_and_a_second_claim() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("train-000000.tar"), b"mine").unwrap();
        let e = OutDir::claim(d.path(), "").err().unwrap().to_string();
        assert!(e.contains("holds no vpa-shard build"), "{e}");
        assert_eq!(std::fs::read(d.path().join("train-000000.tar")).unwrap(), b"mine");

        let d = tempfile::tempdir().unwrap();
        let od = OutDir::claim(d.path(), "").unwrap();
        let e = OutDir::claim(d.path(), "").err().unwrap().to_string();
        assert!(e.contains("another vpa-shard build"), "{e}");
        // Another partition has its own lock and namespace.
        OutDir::claim(d.path(), "-p0001of0002").unwrap();
        od.own("train-000000.tar").unwrap();
        drop(od);
        // A journalled build is recognised, but a file it never created is not its to touch.
        std::fs::write(d.path().join("train-000000.tar"), b"x").unwrap();
        std::fs::write(d.path().join("train-000001.tar"), b"user").unwrap();
        let e = OutDir::claim(d.path(), "").err().unwrap().to_string();
        assert!(e.contains("train-000001.tar is not listed"), "{e}");
    }
}
