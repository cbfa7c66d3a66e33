//! Spill buckets: bounded-memory grouping of a build's items by a 64-bit key.
//!
//! Items go to buckets that are equal ranges of their key (so reading buckets in order and
//! sorting each one sorts everything), as files of `[u32 length][u64 key][bincode]` frames (a
//! scratch format read back by this build only; binary because JSON escaping of the sample texts
//! was a tenth of a build). A small build stays in memory.
//!
//! Memory is bounded by what one bucket holds, whatever the input: a bucket holds at most
//! `budget` bytes of spilled items and at most one item per [`BYTES_PER_ITEM`] of it (a tiny
//! record costs far more in memory, parsed, grouped and ranked, than its few bytes on disk). The
//! bucket count is guessed up front (from the input's size); a bucket that outgrows the bounds is
//! split on reading, by a finer range of the same key, until its parts fit, so the order of keys
//! across parts is kept. Only items sharing one key cannot be split (one group, see `build`).

use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Budget bytes per item a bucket may hold: in flight, a tiny record (a few dozen bytes of input)
/// is ~2-4 KB of structs, strings, maps and its finished sample (measured, release build).
pub const BYTES_PER_ITEM: u64 = 2048;
/// Most bucket files written at once (each has a write buffer of [`WRITE_BUFFER`]).
pub const MAX_BUCKETS: u64 = 1024;
const WRITE_BUFFER: usize = 32 << 10;
/// Buckets a spill that outgrows memory starts with (parts are split further on reading).
const OVERFLOW_BUCKETS: u64 = 64;

/// Bucket of a 64-bit value when buckets are equal ranges (keeps the order across buckets).
pub fn range_bucket(x: u64, n: u64) -> u64 {
    ((x as u128 * n as u128) >> 64) as u64
}

/// Buckets needed for `items` items of `bytes` spilled bytes under `budget` bytes per bucket.
pub fn buckets_for(items: u64, bytes: u64, budget: u64) -> u64 {
    bytes.div_ceil(budget).max(items.div_ceil(max_items(budget))).clamp(1, MAX_BUCKETS)
}

fn max_items(budget: u64) -> u64 {
    (budget / BYTES_PER_ITEM).max(1)
}

/// One bucket file: range `index` of `of` equal ranges of the key.
struct Part {
    path: PathBuf,
    index: u64,
    of: u64,
    items: u64,
    bytes: u64,
    /// Every item has the same key: splitting cannot help.
    one_key: bool,
}

struct Writer {
    part: Part,
    w: BufWriter<File>,
    first_key: Option<u64>,
}

enum State<T> {
    Memory { items: Vec<(u64, T)>, bytes: u64 },
    Writing(Vec<Writer>),
    /// After `finish`: the parts left to read, in key order.
    Reading(VecDeque<Part>),
    Done,
}

pub struct Spill<T> {
    dir: PathBuf,
    prefix: &'static str,
    budget: u64,
    state: State<T>,
    items: u64,
    bytes: u64,
    files: u64,
}

/// Append one `[u32 length][u64 key][payload]` frame to a part (its buffered writer: no copy of
/// the payload into a frame of its own) and count it.
fn write_frame(w: &mut Writer, key: u64, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len()).expect("spill item under 4 GiB");
    (|| {
        w.w.write_all(&len.to_le_bytes())?;
        w.w.write_all(&key.to_le_bytes())?;
        w.w.write_all(payload)
    })()
    .map_err(|e| Error::output(&w.part.path, e))?;
    w.part.items += 1;
    w.part.bytes += payload.len() as u64;
    w.part.one_key &= *w.first_key.get_or_insert(key) == key;
    Ok(())
}

impl<T: Serialize + for<'de> Deserialize<'de> + Send + Sync> Spill<T> {
    /// A spill of `n` buckets (in memory while `n` is 1 and it fits one bucket) with `budget`
    /// bytes per bucket.
    pub fn new(dir: &Path, prefix: &'static str, n: u64, budget: u64) -> Result<Spill<T>> {
        let mut s = Spill { dir: dir.to_path_buf(), prefix, budget, state: State::Memory { items: vec![], bytes: 0 }, items: 0, bytes: 0, files: 0 };
        if n > 1 {
            s.state = State::Writing(s.writers(0, 1, n.min(MAX_BUCKETS))?);
        }
        Ok(s)
    }

    /// Items put so far, and their spilled bytes.
    pub fn len(&self) -> u64 {
        self.items
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn too_big(&self, items: u64, bytes: u64) -> bool {
        items > max_items(self.budget) || bytes > self.budget
    }

    /// Writers for the `k` sub-ranges of range `index` of `of`.
    fn writers(&mut self, index: u64, of: u64, k: u64) -> Result<Vec<Writer>> {
        (0..k)
            .map(|j| {
                self.files += 1;
                let path = self.dir.join(format!("{}-{:06}.bin", self.prefix, self.files));
                let f = File::create(&path).map_err(|e| Error::output(&path, e))?;
                let part = Part { path, index: index * k + j, of: of * k, items: 0, bytes: 0, one_key: true };
                Ok(Writer { part, w: BufWriter::with_capacity(WRITE_BUFFER, f), first_key: None })
            })
            .collect()
    }

    /// Add (key, item) pairs; items are serialised in parallel, written in order.
    pub fn put_many(&mut self, items: Vec<(u64, T)>) -> Result<()> {
        let encoded: Vec<(u64, Vec<u8>)> = match &mut self.state {
            State::Memory { items: held, bytes } => {
                let size: u64 = items.par_iter().map(|(_, t)| bincode::serialized_size(t).expect("spill items serialise")).sum();
                self.items += items.len() as u64;
                self.bytes += size;
                *bytes += size;
                held.extend(items);
                if held.len() as u64 <= max_items(self.budget) && *bytes <= self.budget {
                    return Ok(());
                }
                // Outgrew memory: from now on, files.
                let State::Memory { items: held, .. } = std::mem::replace(&mut self.state, State::Done) else { unreachable!() };
                self.state = State::Writing(self.writers(0, 1, OVERFLOW_BUCKETS)?);
                (self.items, self.bytes) = (0, 0);
                return self.put_many(held);
            }
            State::Writing(_) => items.par_iter().map(|(k, t)| (*k, bincode::serialize(t).expect("spill items serialise"))).collect(),
            _ => panic!("spill: put after finish"),
        };
        let State::Writing(writers) = &mut self.state else { unreachable!() };
        let n = writers.len() as u64;
        for (key, payload) in encoded {
            write_frame(&mut writers[range_bucket(key, n) as usize], key, &payload)?;
            self.items += 1;
            self.bytes += payload.len() as u64;
        }
        Ok(())
    }

    /// Done putting: flush the bucket files.
    pub fn finish(&mut self) -> Result<()> {
        if let State::Writing(_) = self.state {
            let State::Writing(writers) = std::mem::replace(&mut self.state, State::Done) else { unreachable!() };
            let mut parts = VecDeque::new();
            for mut w in writers {
                w.w.flush().map_err(|e| Error::output(&w.part.path, e))?;
                parts.push_back(w.part);
            }
            self.state = State::Reading(parts);
        }
        Ok(())
    }

    /// The next bucket in key order (items in the order they were put), `None` after the last;
    /// a bucket over the bounds is split first. Call [`Spill::finish`] before.
    pub fn next_bucket(&mut self) -> Result<Option<Vec<T>>> {
        loop {
            let part = match &mut self.state {
                State::Memory { .. } => {
                    let State::Memory { items, .. } = std::mem::replace(&mut self.state, State::Done) else { unreachable!() };
                    return Ok(Some(items.into_iter().map(|(_, t)| t).collect()));
                }
                State::Done => return Ok(None),
                State::Writing(_) => panic!("spill: read before finish"),
                State::Reading(q) => match q.pop_front() {
                    Some(p) => p,
                    None => return Ok(None),
                },
            };
            if part.items == 0 {
                std::fs::remove_file(&part.path).map_err(|e| Error::output(&part.path, e))?;
                continue;
            }
            if self.too_big(part.items, part.bytes) && !part.one_key {
                let parts = self.split(part)?;
                let State::Reading(q) = &mut self.state else { unreachable!() };
                for p in parts.into_iter().rev() {
                    q.push_front(p);
                }
                continue;
            }
            return self.read(part).map(Some);
        }
    }

    /// Split a part into enough finer ranges of its key (about half the bounds each).
    fn split(&mut self, part: Part) -> Result<Vec<Part>> {
        let want = part.bytes.div_ceil(self.budget).max(part.items.div_ceil(max_items(self.budget)));
        let k = (2 * want).clamp(2, 256);
        let mut writers = self.writers(part.index, part.of, k)?;
        let mut r = BufReader::with_capacity(1 << 20, File::open(&part.path).map_err(|e| Error::output(&part.path, e))?);
        let corrupt = |e: std::io::Error| Error::output(&part.path, e);
        let mut head = [0u8; 12];
        let mut payload = Vec::new();
        for _ in 0..part.items {
            r.read_exact(&mut head).map_err(corrupt)?;
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
            let key = u64::from_le_bytes(head[4..].try_into().unwrap());
            payload.resize(len, 0);
            r.read_exact(&mut payload).map_err(corrupt)?;
            let j = range_bucket(key, part.of * k) - part.index * k;
            write_frame(&mut writers[j as usize], key, &payload)?;
        }
        drop(r);
        std::fs::remove_file(&part.path).map_err(|e| Error::output(&part.path, e))?;
        let mut parts = Vec::with_capacity(writers.len());
        for mut w in writers {
            w.w.flush().map_err(|e| Error::output(&w.part.path, e))?;
            // Ranges finer than 2^-48 of the key space hold one key in practice; stop there.
            w.part.one_key |= w.part.of > 1 << 48;
            parts.push(w.part);
        }
        Ok(parts)
    }

    /// Read a part whole and decode its items in parallel; the file is removed.
    fn read(&self, part: Part) -> Result<Vec<T>> {
        let p = &part.path;
        let data = std::fs::read(p).map_err(|e| Error::output(p, e))?;
        let corrupt = || Error::output(p, std::io::Error::other("truncated spill file"));
        let mut items = Vec::with_capacity(part.items as usize);
        let mut at = 0usize;
        while at < data.len() {
            let len = data.get(at..at + 4).ok_or_else(corrupt)?;
            let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
            items.push(data.get(at + 12..at + 12 + len).ok_or_else(corrupt)?);
            at += 12 + len;
        }
        let out = items
            .par_iter()
            .map(|item| bincode::deserialize(item).map_err(|e| Error::output(p, std::io::Error::other(e))))
            .collect::<Result<Vec<T>>>()?;
        std::fs::remove_file(p).map_err(|e| Error::output(p, e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Spill<(u64, String)>) -> Vec<Vec<(u64, String)>> {
        s.finish().unwrap();
        std::iter::from_fn(|| s.next_bucket().unwrap()).collect()
    }

    #[test]
    fn buckets_stay_under_the_bounds_and_keep_the_key_order() {
        let d = tempfile::tempdir().unwrap();
        let budget = 16 * BYTES_PER_ITEM; // 16 items a bucket
        let key = |i: u64| crate::build::hash64(&[&i.to_le_bytes()]);
        let items: Vec<(u64, (u64, String))> = (0..2000u64).map(|i| (key(i), (key(i), format!("item {i}")))).collect();
        // Starting in memory (it overflows into files) and starting with too few buckets both split on reading.
        for n in [1, 3] {
            let mut s = Spill::new(d.path(), "t", n, budget).unwrap();
            for chunk in items.chunks(100) {
                s.put_many(chunk.to_vec()).unwrap();
            }
            assert_eq!(s.len(), 2000);
            let buckets = drain(&mut s);
            assert!(buckets.iter().all(|b| b.len() <= 16), "{:?}", buckets.iter().map(Vec::len).collect::<Vec<_>>());
            let mut got: Vec<u64> = buckets.iter().flat_map(|b| {
                let mut keys: Vec<u64> = b.iter().map(|x| x.0).collect();
                keys.sort();
                keys
            }).collect();
            assert!(got.windows(2).all(|w| w[0] <= w[1]), "buckets are ranges of the key, in order");
            got.dedup();
            assert_eq!(got.len(), 2000);
            assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "every part file is removed once read");
        }
        // A small spill stays in memory; items sharing one key stay together however many.
        let mut s = Spill::new(d.path(), "t", 1, budget).unwrap();
        s.put_many((0..10).map(|i| (i, (i, String::new()))).collect()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        assert_eq!(drain(&mut s).len(), 1);
        let mut s = Spill::new(d.path(), "t", 2, budget).unwrap();
        s.put_many((0..100).map(|i| (7, (i, String::new()))).collect()).unwrap();
        assert_eq!(drain(&mut s).iter().map(Vec::len).collect::<Vec<_>>(), vec![100]);
    }
}
