//! JSON lines: one record per line, numbered from 1. A line longer than `--max-record-bytes` is
//! skipped without being held in memory (reported as too large), so one huge line costs nothing.

use super::{Body, Item, Reader, Text};
use crate::error::{Error, Result};
use crate::record::Source;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

pub struct JsonLines<R> {
    t: Text<R>,
    label: String,
    path: PathBuf,
    limit: usize,
    done: bool,
}

impl JsonLines<BufReader<File>> {
    pub fn open(path: &Path, label: &str, limit: usize) -> Result<Self> {
        let (f, _) = super::open_regular(path)?;
        JsonLines::new(BufReader::with_capacity(1 << 20, f), path, label, limit)
    }
}

impl<R: BufRead> JsonLines<R> {
    pub fn new(r: R, path: &Path, label: &str, limit: usize) -> Result<Self> {
        let t = Text::new(r).map_err(|e| Error::input(path, e))?;
        Ok(JsonLines { t, label: label.to_string(), path: path.to_path_buf(), limit, done: false })
    }

    /// The next line: `(bytes or None when over the limit, its length)`; `None` at the end.
    fn line(&mut self) -> std::io::Result<Option<(Option<Vec<u8>>, u64)>> {
        let mut buf = Some(Vec::new());
        let mut len = 0u64;
        let mut any = false;
        loop {
            let avail = self.t.r.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            any = true;
            let (take, end) = match memchr(b'\n', avail) {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            let content = if end { take - 1 } else { take };
            len += content as u64;
            if let Some(b) = &mut buf {
                if b.len() + content > self.limit {
                    buf = None; // over the limit: count the rest, keep nothing
                } else {
                    b.extend_from_slice(&avail[..content]);
                }
            }
            self.t.r.consume(take);
            self.t.bytes += take as u64;
            if end {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        if let Some(b) = &mut buf {
            if b.last() == Some(&b'\r') {
                b.pop();
            }
        }
        Ok(Some((buf, len)))
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

impl<R: BufRead + Send> Reader for JsonLines<R> {
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(max.min(4096));
        let start = self.t.bytes;
        while !self.done && out.len() < max && ((self.t.bytes - start) as usize) < super::CHUNK_BYTES {
            let Some((buf, len)) = self.line().map_err(|e| Error::input(&self.path, e))? else {
                self.done = true;
                break;
            };
            let src = Source::line(self.label.clone(), self.t.line);
            self.t.line += 1;
            let body = match buf {
                None => Body::TooLarge(len),
                Some(b) if b.iter().all(u8::is_ascii_whitespace) => Body::Blank,
                Some(b) => Body::Text(b),
            };
            out.push(Item { src, body });
        }
        Ok(out)
    }

    fn bytes_read(&self) -> u64 {
        self.t.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(data: &[u8], limit: usize) -> Vec<(u64, String)> {
        let mut r = JsonLines::new(data, Path::new("x"), "x", limit).unwrap();
        let mut out = Vec::new();
        loop {
            let c = r.next_chunk(2).unwrap();
            if c.is_empty() {
                break;
            }
            for it in c {
                let what = match it.body {
                    Body::Blank => "blank".to_string(),
                    Body::Text(t) => String::from_utf8(t).unwrap(),
                    Body::TooLarge(n) => format!("too large {n}"),
                    other => format!("{other:?}"),
                };
                out.push((it.src.line, what));
            }
        }
        assert_eq!(r.bytes_read(), data.len() as u64);
        out
    }

    #[test]
    fn lines_bom_crlf_blank_and_too_large() {
        let got = items(b"\xEF\xBB\xBF{\"a\": 1}\r\n\n{\"b\": 22222222}\n{\"c\": 3}", 10);
        assert_eq!(
            got,
            vec![(1, "{\"a\": 1}".into()), (2, "blank".into()), (3, "too large 15".into()), (4, "{\"c\": 3}".into())]
        );
        assert!(items(b"", 10).is_empty());
    }
}
