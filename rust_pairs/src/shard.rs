//! WebDataset tar shards: deterministic bytes, size limits, atomic completion.
//!
//! Each sample is `{key}.{ext}` (the original image bytes) followed by `{key}.json`. Headers are
//! ustar with a fixed mtime, owner 0:0 and mode 0644, so the same samples give the same bytes.
//! A shard is written under a hidden `.NAME.partial` name and renamed when complete: a killed
//! build never leaves a file that looks like a whole shard, and a rerun rewrites it.

use crate::error::{Error, Result};
use crate::image::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Fixed member mtime (2024-01-01T00:00:00Z) for reproducible shards.
pub const FIXED_MTIME: u64 = 1_704_067_200;
const BLOCK: u64 = 512;
/// Fault injection for tests: abort the process once this many shards are complete and the next is half-written.
pub const ABORT_ENV: &str = "RUST_PAIRS_TEST_ABORT_AFTER_SHARDS";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub path: String,
    pub split: String,
    pub samples: u64,
    pub pairs: u64,
    pub responses: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One tar member's data.
pub struct Member<'a> {
    pub name: String,
    pub data: &'a [u8],
}

fn padded(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// Bytes a sample takes in a tar (headers and padding included).
pub fn sample_bytes(members: &[Member]) -> u64 {
    members.iter().map(|m| BLOCK + padded(m.data.len() as u64)).sum()
}

/// A sample's members as tar bytes: ustar header, data, zero padding, for each member. Pure, so
/// samples can be encoded in parallel and appended in order.
pub fn encode_sample(members: &[Member]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(sample_bytes(members) as usize);
    for m in members {
        encode_member(&mut out, &m.name, m.data.len(), |buf| buf.copy_from_slice(m.data))?;
    }
    Ok(out)
}

/// Append one member to `out`; `fill` writes its `len` data bytes in place (so callers can read
/// a file straight into the tar buffer).
pub fn encode_member(out: &mut Vec<u8>, name: &str, len: usize, fill: impl FnOnce(&mut [u8])) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(len as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    let start = out.len();
    out.resize(start + padded(len as u64) as usize, 0);
    fill(&mut out[start..start + len]);
    Ok(())
}

struct HashingFile {
    file: File,
    hasher: Sha256,
    written: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A full buffer (BufWriter hands over 1 MiB at a time) is hashed on another thread while
        // it is written: the appending thread, which hashed and wrote every shard byte in turn,
        // is the sequential part of writing shards (0.6 s of the 100k Parquet build's write stage).
        if buf.len() >= 64 << 10 {
            let (file, hasher) = (&mut self.file, &mut self.hasher);
            let (written, ()) = rayon::join(|| file.write_all(buf), || hasher.update(buf));
            written?;
            self.written += buf.len() as u64;
            return Ok(buf.len());
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

struct Open {
    tmp: PathBuf,
    name: String,
    out: BufWriter<HashingFile>,
    info: ShardInfo,
}

pub struct ShardWriter {
    dir: PathBuf,
    /// e.g. `train` or `train-p0001of0004`.
    prefix: String,
    split: String,
    max_samples: u64,
    max_bytes: u64,
    next_index: usize,
    open: Option<Open>,
    done: Vec<ShardInfo>,
    abort_after: Option<usize>,
    /// fsync each shard before its rename.
    pub durable: bool,
    /// The claimed output directory, told each shard's name before the shard is created.
    pub outdir: Option<std::sync::Arc<crate::outdir::OutDir>>,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &str, suffix: &str, max_samples: u64, max_bytes: u64) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix: format!("{split}{suffix}"),
            split: split.to_string(),
            max_samples,
            max_bytes,
            next_index: 0,
            open: None,
            done: vec![],
            abort_after: std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok()),
            durable: false,
            outdir: None,
        }
    }

    pub fn shard_name(prefix: &str, index: usize) -> String {
        format!("{prefix}-{index:06}.tar")
    }

    fn start(&mut self) -> Result<()> {
        let name = Self::shard_name(&self.prefix, self.next_index);
        self.next_index += 1;
        if let Some(od) = &self.outdir {
            od.own(&name)?;
        }
        let tmp = self.dir.join(format!(".{name}.partial"));
        let file = File::create(&tmp).map_err(|e| Error::output(&tmp, e))?;
        let out = BufWriter::with_capacity(1 << 20, HashingFile { file, hasher: Sha256::new(), written: 0 });
        let info = ShardInfo { path: name.clone(), split: self.split.clone(), samples: 0, pairs: 0, responses: 0, bytes: 0, sha256: String::new() };
        self.open = Some(Open { tmp, name, out, info });
        Ok(())
    }

    /// Append one sample (its members in order), rolling to a new shard at the limits.
    pub fn append(&mut self, members: &[Member], pairs: u64, responses: u64) -> Result<()> {
        let encoded = encode_sample(members).map_err(|e| Error::output(&self.dir, e))?;
        self.append_encoded(&encoded, pairs, responses)
    }

    /// Append a sample already encoded by [`encode_sample`].
    pub fn append_encoded(&mut self, encoded: &[u8], pairs: u64, responses: u64) -> Result<()> {
        let size = encoded.len() as u64;
        if let Some(o) = &self.open {
            let full = o.info.samples >= self.max_samples || o.info.bytes + size + 2 * BLOCK > self.max_bytes;
            if full {
                self.finish_current()?;
            }
        }
        if self.open.is_none() {
            self.start()?;
        }
        let o = self.open.as_mut().unwrap();
        o.out.write_all(encoded).map_err(|e| Error::output(&o.tmp, e))?;
        o.info.samples += 1;
        o.info.pairs += pairs;
        o.info.responses += responses;
        o.info.bytes += size;
        if self.abort_after == Some(self.done.len()) {
            let _ = o.out.flush();
            eprintln!("{ABORT_ENV}: aborting mid-shard as asked");
            std::process::abort();
        }
        Ok(())
    }

    fn finish_current(&mut self) -> Result<()> {
        let Some(o) = self.open.take() else { return Ok(()) };
        let Open { tmp, name, mut out, mut info } = o;
        // End of archive: two zero blocks.
        out.write_all(&[0u8; 2 * BLOCK as usize]).map_err(|e| Error::output(&tmp, e))?;
        let mut hf = out.into_inner().map_err(|e| Error::output(&tmp, e.into_error()))?;
        hf.flush().map_err(|e| Error::output(&tmp, e))?;
        // Renaming a complete file is what makes a killed build safe; fsync adds power-loss
        // durability at the cost of waiting for the disk on every shard, so it is opt-in.
        if self.durable {
            hf.file.sync_all().map_err(|e| Error::output(&tmp, e))?;
        }
        info.bytes = hf.written;
        info.sha256 = hex(&hf.hasher.finalize());
        let dest = self.dir.join(&name);
        std::fs::rename(&tmp, &dest).map_err(|e| Error::output(&dest, e))?;
        self.done.push(info);
        Ok(())
    }

    /// Complete the open shard and return all shards written.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.finish_current()?;
        Ok(self.done)
    }
}

/// Write a whole file atomically (temporary name, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| Error::output(path, e))
}

/// sha256 and length of a file, streamed.
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((hex(&h.finalize()), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, n: usize, max_samples: u64, max_bytes: u64) -> Vec<ShardInfo> {
        let mut w = ShardWriter::new(dir, "train", "", max_samples, max_bytes);
        for i in 0..n {
            let img = vec![i as u8; 700];
            let json = format!("{{\"i\": {i}}}");
            let members = [Member { name: format!("k{i:04}.png"), data: &img }, Member { name: format!("k{i:04}.json"), data: json.as_bytes() }];
            w.append(&members, 1, 2).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn limits_roll_shards_and_bytes_are_stable() {
        let d1 = tempfile::tempdir().unwrap();
        let shards = write(d1.path(), 5, 2, 1 << 20);
        assert_eq!(shards.iter().map(|s| s.samples).collect::<Vec<_>>(), vec![2, 2, 1]);
        for s in &shards {
            let (sha, len) = file_sha256(&d1.path().join(&s.path)).unwrap();
            assert_eq!((sha.as_str(), len), (s.sha256.as_str(), s.bytes));
        }
        // One sample is 512+1024 + 512+512 = 2560 bytes; 6000 bytes hold two (plus 1024 end blocks).
        let d2 = tempfile::tempdir().unwrap();
        let by_bytes = write(d2.path(), 5, 100, 6500);
        assert_eq!(by_bytes.iter().map(|s| s.samples).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(shards.iter().map(|s| &s.sha256).collect::<Vec<_>>(), by_bytes.iter().map(|s| &s.sha256).collect::<Vec<_>>());
        // No partial files are left behind.
        assert!(std::fs::read_dir(d1.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".partial")));
        // The stock tar reader sees the members with fixed metadata.
        let mut ar = tar::Archive::new(File::open(d1.path().join("train-000000.tar")).unwrap());
        let names: Vec<(String, u64)> =
            ar.entries().unwrap().map(|e| { let e = e.unwrap(); (e.path().unwrap().display().to_string(), e.header().mtime().unwrap()) }).collect();
        assert_eq!(names[0], ("k0000.png".to_string(), FIXED_MTIME));
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn a_shard_of_many_buffers_hashes_as_its_file() {
        // 1000 samples of 2560 bytes: the 1 MiB buffer is handed over (hashed and written at once) twice.
        let d = tempfile::tempdir().unwrap();
        let shards = write(d.path(), 1000, 1000, 1 << 30);
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].bytes, 1000 * 2560 + 1024);
        let (sha, len) = file_sha256(&d.path().join(&shards[0].path)).unwrap();
        assert_eq!((sha.as_str(), len), (shards[0].sha256.as_str(), shards[0].bytes));
    }
}
