//! A JSON array of records (one line or pretty-printed), streamed element by element: a scanner
//! that knows strings and nesting cuts out each element's bytes; the array is never loaded
//! whole. An element's position is the line where it starts plus its 0-based index. The elements
//! themselves are parsed (and their errors reported) by the build like JSON lines. Anything that
//! breaks the array itself (a missing comma, a cut-off file) ends the file with one reject.

use super::{Body, Item, Reader, Text};
use crate::error::{Error, Result};
use crate::record::Source;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

#[derive(PartialEq)]
enum State {
    Start,
    First,
    Next,
    Done,
}

pub struct JsonArray<R> {
    t: Text<R>,
    label: String,
    path: PathBuf,
    limit: usize,
    index: u64,
    state: State,
}

impl JsonArray<BufReader<File>> {
    pub fn open(path: &Path, label: &str, limit: usize) -> Result<Self> {
        let (f, _) = super::open_regular(path)?;
        JsonArray::new(BufReader::with_capacity(1 << 20, f), path, label, limit)
    }
}

impl<R: BufRead> JsonArray<R> {
    pub fn new(r: R, path: &Path, label: &str, limit: usize) -> Result<Self> {
        let t = Text::new(r).map_err(|e| Error::input(path, e))?;
        Ok(JsonArray { t, label: label.into(), path: path.into(), limit, index: 0, state: State::Start })
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.t.r.fill_buf()?.first().copied())
    }

    fn bump(&mut self, b: u8) {
        self.t.r.consume(1);
        self.t.bytes += 1;
        if b == b'\n' {
            self.t.line += 1;
        }
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            // Whole runs of whitespace at a time.
            let buf = self.t.r.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let n = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
            let lines = buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            let next = buf.get(n).copied();
            self.t.r.consume(n);
            self.t.bytes += n as u64;
            self.t.line += lines;
            if next.is_some() {
                return Ok(next);
            }
        }
    }

    /// Scan one element from its first byte; `Ok(None)` when the file ends inside it.
    fn element(&mut self) -> std::io::Result<Option<(Option<Vec<u8>>, u64)>> {
        let mut out = Some(Vec::new());
        let mut len = 0usize;
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        let first = self.peek()?.expect("caller saw a byte");
        let scalar = !matches!(first, b'{' | b'[' | b'"');
        loop {
            let buf = self.t.r.fill_buf()?;
            if buf.is_empty() {
                return Ok(if scalar && len > 0 { Some((out, len as u64)) } else { None });
            }
            let mut i = 0;
            let mut end = false;
            while i < buf.len() {
                let b = buf[i];
                if in_str {
                    if esc {
                        esc = false;
                    } else if b == b'\\' {
                        esc = true;
                    } else if b == b'"' {
                        in_str = false;
                        if depth == 0 {
                            i += 1;
                            end = true;
                            break;
                        }
                    }
                } else if scalar {
                    if b.is_ascii_whitespace() || b == b',' || b == b']' {
                        end = true;
                        break;
                    }
                } else {
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                i += 1;
                                end = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                i += 1;
            }
            if let Some(o) = &mut out {
                if o.len() + i > self.limit {
                    out = None;
                } else {
                    o.extend_from_slice(&buf[..i]);
                }
            }
            let lines = buf[..i].iter().filter(|&&b| b == b'\n').count() as u64;
            len += i;
            self.t.r.consume(i);
            self.t.bytes += i as u64;
            self.t.line += lines;
            if end {
                return Ok(Some((out, len as u64)));
            }
        }
    }

    fn broken(&mut self, src: Source, why: String) -> Item {
        self.state = State::Done;
        Item { src, body: Body::Broken(why) }
    }

    fn next_item(&mut self) -> std::io::Result<Option<Item>> {
        let here = |s: &Self| Source { index: Some(s.index), ..Source::line(s.label.clone(), s.t.line) };
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Start => match self.skip_ws()? {
                    Some(b'[') => {
                        self.bump(b'[');
                        self.state = State::First;
                    }
                    _ => return Ok(Some(self.broken(here(self), "expected a JSON array starting with '['".into()))),
                },
                State::First | State::Next => {
                    let c = self.skip_ws()?;
                    match (c, &self.state) {
                        (None, _) => return Ok(Some(self.broken(here(self), "JSON array ends without its closing ']' (file cut short?)".into()))),
                        (Some(b']'), _) => {
                            self.bump(b']');
                            self.state = State::Done;
                            if let Some(b) = self.skip_ws()? {
                                let why = format!("unexpected {:?} after the closing ']' of the JSON array", b as char);
                                return Ok(Some(self.broken(here(self), why)));
                            }
                            return Ok(None);
                        }
                        (Some(b','), State::Next) => {
                            self.bump(b',');
                            match self.skip_ws()? {
                                Some(b']') | None => {
                                    return Ok(Some(self.broken(here(self), "JSON array has a trailing comma or ends after one".into())))
                                }
                                Some(_) => {}
                            }
                        }
                        (Some(b), State::Next) => {
                            let why = format!("expected ',' or ']' between array elements, found {:?}", b as char);
                            return Ok(Some(self.broken(here(self), why)));
                        }
                        _ => {}
                    }
                    let src = here(self);
                    let body = match self.element()? {
                        None => return Ok(Some(self.broken(src, "JSON array ends inside an element (file cut short?)".into()))),
                        Some((Some(bytes), _)) => Body::Text(bytes),
                        Some((None, len)) => Body::TooLarge(len),
                    };
                    self.index += 1;
                    self.state = State::Next;
                    return Ok(Some(Item { src, body }));
                }
            }
        }
    }
}

impl<R: BufRead + Send> Reader for JsonArray<R> {
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(max.min(4096));
        let start = self.t.bytes;
        while out.len() < max && ((self.t.bytes - start) as usize) < super::CHUNK_BYTES {
            match self.next_item().map_err(|e| Error::input(&self.path, e))? {
                Some(it) => out.push(it),
                None => break,
            }
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

    fn items(data: &str, limit: usize) -> Vec<(u64, Option<u64>, String)> {
        let mut r = JsonArray::new(data.as_bytes(), Path::new("x"), "x", limit).unwrap();
        let mut out = Vec::new();
        loop {
            let c = r.next_chunk(3).unwrap();
            if c.is_empty() {
                break;
            }
            for it in c {
                let what = match it.body {
                    Body::Text(t) => String::from_utf8(t).unwrap(),
                    Body::TooLarge(_) => "too large".into(),
                    Body::Broken(w) => format!("broken: {w}"),
                    other => format!("{other:?}"),
                };
                out.push((it.src.line, it.src.index, what));
            }
        }
        out
    }

    #[test]
    fn pretty_and_one_line_arrays() {
        let pretty = "\u{feff}[\n  {\n    \"a\": \"x ] } \\\" [\",\n    \"b\": [1, {\"c\": 2}]\n  },\n  {\"d\": null}\n]\n";
        assert_eq!(
            items(pretty, 1000),
            vec![
                (2, Some(0), "{\n    \"a\": \"x ] } \\\" [\",\n    \"b\": [1, {\"c\": 2}]\n  }".into()),
                (6, Some(1), "{\"d\": null}".into())
            ]
        );
        assert_eq!(items("[{\"a\":1},{\"b\":2}, 3, \"s\"]", 1000).iter().map(|x| x.2.as_str()).collect::<Vec<_>>(), ["{\"a\":1}", "{\"b\":2}", "3", "\"s\""]);
        assert!(items("[]", 10).is_empty());
        assert!(items("  [ \n ] \n", 10).is_empty());
    }

    #[test]
    fn broken_arrays_end_with_one_reject() {
        let got = items("[{\"a\": 1},\n{\"b\": 2", 1000);
        assert_eq!(got[0].2, "{\"a\": 1}");
        assert_eq!((got[1].0, got[1].1), (2, Some(1)));
        assert!(got[1].2.contains("ends inside an element"), "{got:?}");
        assert_eq!(got.len(), 2);
        assert!(items("[{\"a\": 1} {\"b\": 2}]", 1000)[1].2.contains("expected ',' or ']'"));
        assert!(items("[{\"a\": 1},", 1000)[1].2.contains("trailing comma"));
        assert!(items("[{\"a\": 1}", 1000)[1].2.contains("without its closing"));
        assert!(items("[{\"a\": 1}] x", 1000)[1].2.contains("after the closing"));
        let big = items("[{\"a\": \"0123456789\"}, {\"b\": 1}]", 12);
        assert_eq!((big[0].2.as_str(), big[1].2.as_str()), ("too large", "{\"b\": 1}"));
    }
}
