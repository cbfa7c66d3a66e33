//! Containers: how records are laid out in a file, apart from what their fields mean (layouts,
//! [`crate::layout`]). Detected from the content, never from the file name:
//!
//! - [`jsonl`]: one JSON record per line (also a `.json` file holding JSON lines);
//! - [`json_array`]: one JSON array of records, on one line or pretty-printed, read element by
//!   element (never loaded whole);
//! - [`parquet`]: Parquet files (`PAR1` magic), read row group by row group; the `datasets`
//!   `Image()` struct `{bytes, path}` becomes an embedded image (see [`crate::row`]);
//! - [`mmpr`]: an InternVL/MMPR `meta.json` naming several annotation files, each with its image
//!   folder.
//!
//! A UTF-8 byte-order mark at the start of a text file is skipped. Each reader yields
//! [`Item`]s with their position ([`Source`]: line, plus the array index or the Parquet row group
//! and row). A record over `--max-record-bytes` is skipped unread and reported; a container that
//! breaks off (a JSON array cut short) yields one last [`Body::Broken`] item, reported as a reject.

pub mod json_array;
pub mod jsonl;
pub mod mmpr;
#[cfg(feature = "parquet")]
pub mod parquet;

use crate::error::{Error, Result};
use crate::record::Source;
use crate::row::Row;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// UTF-8 byte-order mark.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";
/// A chunk of items stops growing past this many bytes of record data (bounds memory when
/// records are large; the build validates a chunk while reading the next).
pub const CHUNK_BYTES: usize = 32 << 20;
/// Bytes looked at to recognise a container.
const SNIFF_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Jsonl,
    JsonArray,
    Parquet,
    MmprMeta,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Jsonl => "jsonl",
            Kind::JsonArray => "json-array",
            Kind::Parquet => "parquet",
            Kind::MmprMeta => "mmpr-meta",
        }
    }
}

/// What a container yields for one record.
#[derive(Debug)]
pub enum Body {
    /// An empty line of a JSONL file (not a record).
    Blank,
    /// The JSON text of one record.
    Text(Vec<u8>),
    /// A record that is already a value (a Parquet row), with its embedded bytes.
    Row(Row),
    /// A record of this many bytes, over `--max-record-bytes`: skipped unread.
    TooLarge(u64),
    /// The container broke off here (the reason says how); nothing after it can be read.
    Broken(String),
}

#[derive(Debug)]
pub struct Item {
    pub src: Source,
    pub body: Body,
}

/// A source of records, read in chunks.
pub trait Reader: Send {
    /// Up to `max` items; an empty chunk means the end.
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Item>>;
    /// Input bytes consumed so far (for progress; approximate for Parquet).
    fn bytes_read(&self) -> u64;
}

/// One file to read: its container, the label its records are reported under, and where its
/// relative image paths start (`None`: `--image-root`, else the file's folder).
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub path: PathBuf,
    pub label: String,
    pub kind: Kind,
    pub image_root: Option<PathBuf>,
}

/// Recognise a file's container from its first bytes (and, for a JSON object, whether it is an
/// MMPR meta file). `Err` names the file and what was expected.
pub fn sniff(path: &Path) -> Result<Kind> {
    let (mut f, meta) = open_regular(path)?;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    (&mut f).take(SNIFF_BYTES as u64).read_to_end(&mut head).map_err(|e| Error::input(path, e))?;
    if head.starts_with(b"PAR1") {
        return Ok(Kind::Parquet);
    }
    let text = head.strip_prefix(BOM).unwrap_or(&head);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| text[i]) {
        None => Ok(Kind::Jsonl), // empty or blank: no records (the build says so)
        Some(b'[') => Ok(Kind::JsonArray),
        Some(b'{') => Ok(if mmpr::looks_like_meta(path, text, meta.len())? { Kind::MmprMeta } else { Kind::Jsonl }),
        Some(_) => {
            let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(Error::Input {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "not a supported input: expected JSON lines or a JSON array (text starting with '{{' or '['), \
                     Parquet (starting with PAR1) or an InternVL/MMPR meta.json; it starts with bytes {}",
                    shown.join(" ")
                )),
            })
        }
    }
}

/// What an input must be, ending the error for one that is not a regular file.
pub const EXPECTED: &str = "expected a data file (JSON lines, a JSON array, Parquet or an InternVL/MMPR meta.json) or a directory";

/// Open an input file if it is a regular file (a FIFO is never waited on: see [`crate::regular`]).
pub fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata)> {
    crate::regular::open(path, EXPECTED).map_err(|e| Error::input(path, e))
}

/// Open a reader over one input.
pub fn open(input: &Input, max_record_bytes: usize) -> Result<Box<dyn Reader>> {
    match input.kind {
        Kind::Jsonl => Ok(Box::new(jsonl::JsonLines::open(&input.path, &input.label, max_record_bytes)?)),
        Kind::JsonArray => Ok(Box::new(json_array::JsonArray::open(&input.path, &input.label, max_record_bytes)?)),
        #[cfg(feature = "parquet")]
        Kind::Parquet => Ok(Box::new(parquet::ParquetRows::open(&input.path, &input.label, max_record_bytes)?)),
        #[cfg(not(feature = "parquet"))]
        Kind::Parquet => Err(Error::Input {
            path: input.path.clone(),
            source: std::io::Error::other("a Parquet file, but this build of rust_pairs has no `parquet` feature"),
        }),
        Kind::MmprMeta => Err(Error::Input {
            path: input.path.clone(),
            source: std::io::Error::other("an MMPR meta file is expanded into its annotation files, not read itself"),
        }),
    }
}

/// Whether a directory entry is a candidate input (by extension: directories hold images,
/// READMEs and the like beside the data; the content still decides the container).
fn is_candidate(p: &Path) -> bool {
    let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    matches!(ext.as_str(), "jsonl" | "json" | "parquet")
}

/// Every candidate file under `dir`, recursively, sorted; hidden entries (`.cache/`, `.git/`) skipped.
/// A candidate that is not a regular file (a FIFO named `x.jsonl`) goes to `skipped` with the
/// reason, unopened.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, skipped: &mut Vec<Skipped>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::input(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let meta = std::fs::metadata(&p).map_err(|e| Error::input(&p, e))?;
        if meta.is_dir() {
            walk(&p, out, skipped)?;
        } else if is_candidate(&p) {
            match crate::regular::special_kind(meta.file_type()) {
                None => out.push(p),
                Some(what) => skipped.push(Skipped {
                    file: p.to_string_lossy().to_string(),
                    reason: format!("not read: {}", crate::regular::not_regular(what, EXPECTED)),
                }),
            }
        }
    }
    Ok(())
}

/// A file found in a directory input that was not read, and why (a FIFO, a socket, a device).
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// The inputs given on the command line as files to read: a directory gives every JSONL, JSON
/// and Parquet file under it (recursively, sorted); an MMPR meta file gives its annotation files
/// (which are then not read a second time as plain files of a directory). A file named on the
/// command line (or by a meta file) that is not a regular file stops the build; one found in a
/// directory is skipped and reported (the second list).
pub fn expand(inputs: &[String], image_root: Option<&Path>) -> Result<(Vec<Input>, Vec<Skipped>)> {
    let mut files: Vec<(PathBuf, Kind)> = Vec::new();
    let mut skipped = Vec::new();
    for i in inputs {
        let p = PathBuf::from(i);
        let meta = std::fs::metadata(&p).map_err(|e| Error::input(&p, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(&p, &mut found, &mut skipped)?;
            if found.is_empty() && skipped.is_empty() {
                return Err(Error::input(&p, std::io::Error::other("directory holds no *.jsonl, *.json or *.parquet file")));
            }
            for f in found {
                let kind = sniff(&f)?;
                files.push((f, kind));
            }
        } else {
            let kind = sniff(&p)?;
            files.push((p, kind));
        }
    }
    let mut out = Vec::new();
    let mut from_meta = Vec::new();
    for (path, kind) in &files {
        if *kind == Kind::MmprMeta {
            for input in mmpr::expand(path, image_root)? {
                from_meta.push(std::fs::canonicalize(&input.path).unwrap_or_else(|_| input.path.clone()));
                out.push(input);
            }
        }
    }
    for (path, kind) in files {
        if kind == Kind::MmprMeta {
            continue;
        }
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if from_meta.contains(&canon) {
            continue;
        }
        out.push(Input { label: path.to_string_lossy().to_string(), path, kind, image_root: None });
    }
    Ok((out, skipped))
}

/// Shared by the text readers: a buffered reader that counts lines and bytes and skips a BOM.
pub(crate) struct Text<R> {
    pub r: R,
    pub line: u64,
    pub bytes: u64,
}

impl<R: std::io::BufRead> Text<R> {
    pub fn new(mut r: R) -> std::io::Result<Text<R>> {
        let bom = r.fill_buf()?.starts_with(BOM);
        if bom {
            r.consume(BOM.len());
        }
        Ok(Text { r, line: 1, bytes: if bom { BOM.len() as u64 } else { 0 } })
    }
}
