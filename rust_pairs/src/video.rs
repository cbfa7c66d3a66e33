//! Videos: where a record's video comes from, reading it, and checking it without decoding a frame.
//!
//! A video is a container file (mp4/mov, webm/mkv, avi) or a sequence of frame images: a frame
//! folder (the LLaVA-Hound / ShareGPT-Video and MM-RLHF layout: its image files sorted by name in
//! natural order, `frame_2` before `frame_10`) or a list of frame paths. A file is checked by its
//! container structure while it is hashed, in one pass that reads it once and holds a buffer, not
//! the file: the top-level MP4 box walk (`ftyp` first, a `moov` and an `mdat`, every box size
//! consistent with the file's length), the EBML header's DocType (`webm` / `matroska`) and the
//! Segment's element sizes (with `Tracks` and a `Cluster`), the AVI `RIFF` chunk sizes (with
//! `hdrl` and `movi` lists). Frames are images and get the image checks ([`crate::image`]).
//! Its bytes go into the shard as they came, never re-encoded: the build copies a checked file
//! into a scratch blob ([`VideoBlob`]) and verifies that the bytes copied are the bytes checked.

use crate::image::{self, hex, ImageFile};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shard member extensions of the video containers a build accepts (from the bytes, not the name).
pub const EXTENSIONS: [&str; 5] = ["mp4", "mov", "webm", "mkv", "avi"];

/// `--max-video-bytes`' default: 2 GiB.
pub const DEFAULT_MAX_VIDEO_BYTES: u64 = 2 << 30;

/// The largest `--max-video-bytes`: a tar member's size field (11 octal digits) holds less than 8 GiB.
pub const MAX_VIDEO_BYTES_LIMIT: u64 = (8 << 30) - 1;

/// File name extensions of the files a frame folder's frames are taken from (case ignored);
/// the image type itself comes from the bytes, as for any image.
pub const FRAME_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// The `<video>` placeholder of LLaVA-style, ms-swift and LLaMA-Factory prompts.
pub const VIDEO_MARKER: &str = "<video>";

/// Where one video of a record comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoSrc {
    /// A path, absolute or relative to the image root: a container file or a frame folder.
    Path(String),
    /// Frame image paths, in the order given.
    Frames(Vec<String>),
    /// Container bytes embedded in the row (a Parquet `{bytes, path}` struct, blob `index`).
    Embedded { index: usize, name: Option<String> },
}

impl VideoSrc {
    /// How the video is named in rejects and provenance.
    pub fn label(&self) -> String {
        match self {
            VideoSrc::Path(p) => p.clone(),
            VideoSrc::Frames(f) => match f.first() {
                Some(first) => format!("{} frames from {first}", f.len()),
                None => "an empty frame list".to_string(),
            },
            VideoSrc::Embedded { index, name: Some(n) } => format!("{n} (embedded bytes #{index})"),
            VideoSrc::Embedded { index, name: None } => format!("embedded bytes #{index}"),
        }
    }
}

/// Whether a video field names no video (absent, null, `""`, `[]`, `{}`): such a record has none.
pub fn is_empty_field(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

fn one(v: &Value) -> Result<VideoSrc, String> {
    use crate::row::{blob_index, type_name};
    match v {
        Value::String(s) if s.trim().is_empty() => Err("empty video path".into()),
        Value::String(s) => Ok(VideoSrc::Path(s.clone())),
        Value::Array(frames) => {
            if frames.is_empty() {
                return Err("an empty list of frames".into());
            }
            frames
                .iter()
                .enumerate()
                .map(|(j, f)| match f {
                    Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                    Value::String(_) => Err(format!("frame {j}: empty path")),
                    other => Err(format!("frame {j}: expected a frame image path, got {}", type_name(other))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(VideoSrc::Frames)
        }
        Value::Object(_) if blob_index(v).is_some() => Ok(VideoSrc::Embedded { index: blob_index(v).unwrap(), name: None }),
        Value::Object(o) if o.contains_key("bytes") || o.contains_key("path") => {
            let name = match o.get("path") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.trim().is_empty() => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(format!("video struct: \"path\" must be a string, got {}", type_name(other))),
            };
            match o.get("bytes") {
                None | Some(Value::Null) => name.map(VideoSrc::Path).ok_or_else(|| "video struct has neither bytes nor a path".to_string()),
                Some(b) => match blob_index(b) {
                    Some(index) => Ok(VideoSrc::Embedded { index, name }),
                    None => Err(format!("video struct: \"bytes\" must be binary (a Parquet binary column), got {}", type_name(b))),
                },
            }
        }
        other => Err(format!("expected a video path, a list of frame paths or a {{bytes, path}} struct, got {}", type_name(other))),
    }
}

/// The videos a field names, in order (the i-th fills the i-th `<video>` placeholder): a path
/// (a container file or a frame folder), a `{bytes, path}` struct, or a list of videos, each a
/// path, a struct, or a list of frame paths. A field that [`is_empty_field`] names none. Returns
/// the videos and whether the field was a list (rejects then name `field[i]`).
pub fn video_refs(v: &Value) -> Result<(Vec<VideoSrc>, bool), String> {
    if is_empty_field(v) {
        return Ok((vec![], false));
    }
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| one(it).map_err(|e| format!("item {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| (v, true)),
        other => one(other).map(|s| (vec![s], false)),
    }
}

/// Where a checked container file's bytes are: still in the file (read again when copied into
/// the scratch blob, and verified), or in memory (embedded in the row).
#[derive(Debug)]
pub enum Body {
    File(File),
    Bytes(Vec<u8>),
}

/// A container file, hashed and checked.
#[derive(Debug)]
pub struct VideoFile {
    pub label: PathBuf,
    pub ext: &'static str,
    pub sha256: String,
    pub len: u64,
    /// The frame size the container records for its video track (width, height), where it does.
    pub picture: Option<(u64, u64)>,
    pub body: Body,
}

/// A video read and hashed: a container file, or frame images (read, not yet checked as images).
#[derive(Debug)]
pub enum VideoRead {
    File(VideoFile),
    Frames { label: PathBuf, frames: Vec<ImageFile>, sha256: String },
}

impl VideoRead {
    pub fn sha256(&self) -> &str {
        match self {
            VideoRead::File(f) => &f.sha256,
            VideoRead::Frames { sha256, .. } => sha256,
        }
    }

    pub fn label(&self) -> String {
        match self {
            VideoRead::File(f) => f.label.display().to_string(),
            VideoRead::Frames { label, .. } => label.display().to_string(),
        }
    }

    /// Bytes the video puts into a shard.
    pub fn bytes(&self) -> u64 {
        match self {
            VideoRead::File(f) => f.len,
            VideoRead::Frames { frames, .. } => frames.iter().map(|f| f.bytes.len() as u64).sum(),
        }
    }
}

/// Identity of a frame sequence: sha256 over its frames' sha256 hex digests joined by newlines.
pub fn frames_sha256<'a>(shas: impl IntoIterator<Item = &'a str>) -> String {
    image::sha256_hex(shas.into_iter().collect::<Vec<_>>().join("\n").as_bytes())
}

/// Read one video (`blobs` are the row's embedded bytes; the one used is taken). A file over
/// `max_bytes` is rejected from its size before a byte is read; frames count against it together.
/// When `cancel` is set while a file is read, reading stops with [`CANCELLED`].
pub fn read(src: &VideoSrc, root: &Path, max_bytes: u64, blobs: &mut [Vec<u8>], cancel: &AtomicBool) -> Result<VideoRead, String> {
    match src {
        VideoSrc::Path(p) => read_path(&image::resolve(p, root), max_bytes, cancel),
        VideoSrc::Frames(paths) => {
            let files: Vec<PathBuf> = paths.iter().map(|p| image::resolve(p, root)).collect();
            let label = PathBuf::from(src.label());
            read_frames(label, &files, max_bytes)
        }
        VideoSrc::Embedded { index, .. } => {
            let label = PathBuf::from(src.label());
            let Some(b) = blobs.get_mut(*index) else {
                return Err(format!("{} names no embedded video (only Parquet binary columns embed bytes)", src.label()));
            };
            let bytes = std::mem::take(b);
            let len = bytes.len() as u64;
            if len == 0 {
                return Err(format!("video {} is empty", label.display()));
            }
            if len > max_bytes {
                return Err(over_limit(&label, len, max_bytes));
            }
            let c = check_container(&mut Cursor::new(&bytes[..]), len, &head_of(&bytes), cancel).map_err(|e| format!("video {}: {e}", label.display()))?;
            Ok(VideoRead::File(VideoFile { label, ext: c.ext, sha256: c.sha256, len, picture: c.picture, body: Body::Bytes(bytes) }))
        }
    }
}

fn over_limit(label: &Path, len: u64, max: u64) -> String {
    format!("video {} is {len} bytes, over the limit of {max} (--max-video-bytes)", label.display())
}

fn head_of(b: &[u8]) -> [u8; 12] {
    let mut h = [0u8; 12];
    let n = b.len().min(12);
    h[..n].copy_from_slice(&b[..n]);
    h
}

/// The reason a read stopped because the build was interrupted (the record is discarded).
pub const CANCELLED: &str = "interrupted";

fn read_path(path: &Path, max_bytes: u64, cancel: &AtomicBool) -> Result<VideoRead, String> {
    // Never blocks on a FIFO (see crate::regular); a directory opens and is a frame folder.
    let f = crate::regular::open_nonblocking(path).map_err(|e| format!("video {} is missing or unreadable: {e}", path.display()))?;
    let meta = f.metadata().map_err(|e| format!("video {} is unreadable: {e}", path.display()))?;
    if meta.is_dir() {
        drop(f);
        return read_folder(path, max_bytes);
    }
    if let Some(what) = crate::regular::special_kind(meta.file_type()) {
        return Err(format!("video {} is not a regular file ({what}); only regular files and frame folders are read", path.display()));
    }
    let len = meta.len();
    if len == 0 {
        return Err(format!("video {} is empty", path.display()));
    }
    if len > max_bytes {
        return Err(over_limit(path, len, max_bytes));
    }
    let mut head = [0u8; 12];
    let n = read_at_most(&f, &mut head, 0).map_err(|e| format!("video {} is unreadable: {e}", path.display()))?;
    head[n..].fill(0);
    let mut r = &f;
    let c = check_container(&mut r, len, &head, cancel).map_err(|e| format!("video {}: {e}", path.display()))?;
    Ok(VideoRead::File(VideoFile { label: path.to_path_buf(), ext: c.ext, sha256: c.sha256, len, picture: c.picture, body: Body::File(f) }))
}

fn read_at_most(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Compare names in natural order: runs of digits by value (`frame_2` < `frame_10`), the rest
/// by character; equal values with more leading zeros after, then the names bytewise.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (ab, bb) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < ab.len() && j < bb.len() {
        if ab[i].is_ascii_digit() && bb[j].is_ascii_digit() {
            let (si, sj) = (i, j);
            while i < ab.len() && ab[i].is_ascii_digit() {
                i += 1;
            }
            while j < bb.len() && bb[j].is_ascii_digit() {
                j += 1;
            }
            let (da, db) = (&a[si..i], &b[sj..j]);
            let (ta, tb) = (da.trim_start_matches('0'), db.trim_start_matches('0'));
            let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb)).then_with(|| da.len().cmp(&db.len()));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            if ab[i] != bb[j] {
                return ab[i].cmp(&bb[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (ab.len() - i).cmp(&(bb.len() - j)).then_with(|| ab.cmp(bb))
}

/// A frame folder's frames: its files with an image extension (hidden files and sub-folders
/// left out), in natural order of their names.
pub fn folder_frames(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("frame folder {} is unreadable: {e}", dir.display()))?;
    let mut names: Vec<String> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| format!("frame folder {} is unreadable: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let ext = name.rsplit_once('.').map(|(_, x)| x.to_ascii_lowercase()).unwrap_or_default();
        if !FRAME_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        // Following links, as opening it will; a sub-folder named like an image is not a frame.
        if std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        names.push(name);
    }
    names.sort_by(|a, b| natural_cmp(a, b));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

fn read_folder(dir: &Path, max_bytes: u64) -> Result<VideoRead, String> {
    let frames = folder_frames(dir)?;
    if frames.is_empty() {
        return Err(format!(
            "frame folder {} holds no frame images (files named *.{}): a video without frames",
            dir.display(),
            FRAME_EXTENSIONS.join(", *.")
        ));
    }
    read_frames(dir.to_path_buf(), &frames, max_bytes)
}

fn read_frames(label: PathBuf, files: &[PathBuf], max_bytes: u64) -> Result<VideoRead, String> {
    let mut frames = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for (j, p) in files.iter().enumerate() {
        let img = image::read(p).map_err(|e| format!("frame {j} of {}: {e}", label.display()))?;
        total += img.bytes.len() as u64;
        if total > max_bytes {
            return Err(format!(
                "video {}: its frames take more than {max_bytes} bytes (--max-video-bytes) by frame {j}",
                label.display()
            ));
        }
        frames.push(img);
    }
    let sha256 = frames_sha256(frames.iter().map(|f| f.sha256.as_str()));
    Ok(VideoRead::Frames { label, frames, sha256 })
}

/// Check a video's frames as images (see [`image::check`]; the first failure names the frame), or
/// a video file's recorded frame size against the same pixel limit: a frame over it would be a
/// decompression bomb for every decoder downstream, found here without decoding one.
pub fn check_frames(v: &VideoRead, mode: crate::config::ImageCheck, max_pixels: u64) -> Result<(), String> {
    match v {
        VideoRead::Frames { label, frames, .. } => {
            for (j, f) in frames.iter().enumerate() {
                image::check(f, mode, max_pixels).map_err(|e| format!("frame {j} of {}: {e}", label.display()))?;
            }
        }
        VideoRead::File(f) => {
            if let Some((w, h)) = f.picture {
                let pixels = w.saturating_mul(h);
                if pixels > max_pixels {
                    return Err(format!(
                        "video {} has {w}x{h} = {pixels} pixels per frame, over the limit of {max_pixels} (--max-image-pixels)",
                        f.label.display()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A forward-only reader over a video's `len` bytes that hashes everything it reads or skips:
/// the structure walk and the sha256 are one pass, so the bytes hashed are the bytes checked.
struct Walk<'r> {
    src: &'r mut dyn Read,
    pos: u64,
    len: u64,
    hasher: Sha256,
    buf: Vec<u8>,
    cancel: &'r AtomicBool,
}

impl<'r> Walk<'r> {
    fn new(src: &'r mut dyn Read, len: u64, cancel: &'r AtomicBool) -> Self {
        Walk { src, pos: 0, len, hasher: Sha256::new(), buf: vec![0; len.clamp(16, 1 << 20) as usize], cancel }
    }

    fn fill(&mut self, n: usize) -> Result<(), String> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(CANCELLED.into());
        }
        let mut got = 0;
        while got < n {
            match self.src.read(&mut self.buf[got..n]) {
                Ok(0) => return Err(format!("the file shrank while it was read (ended at byte {})", self.pos + got as u64)),
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("unreadable at byte {}: {e}", self.pos + got as u64)),
            }
        }
        self.hasher.update(&self.buf[..n]);
        self.pos += n as u64;
        Ok(())
    }

    /// The next `n` (small) bytes; `what` names them in the message when the file ends first.
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>, String> {
        if self.pos + n as u64 > self.len {
            return Err(format!("truncated: {what} at byte {} needs {n} bytes, the file ends at byte {}", self.pos, self.len));
        }
        let mut out = Vec::with_capacity(n);
        let mut left = n;
        while left > 0 {
            let k = left.min(self.buf.len());
            self.fill(k)?;
            out.extend_from_slice(&self.buf[..k]);
            left -= k;
        }
        Ok(out)
    }

    /// Skip (reading and hashing) to byte `end`; `what` names the element that declared it.
    fn skip_to(&mut self, end: u64, what: &str) -> Result<(), String> {
        if end > self.len {
            return Err(format!("truncated: {what} ends at byte {end}, past the end of the file ({} bytes)", self.len));
        }
        while self.pos < end {
            let k = ((end - self.pos) as usize).min(self.buf.len());
            self.fill(k)?;
        }
        Ok(())
    }

    fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// Which container the first bytes say a file is, and its shard extension.
pub fn detect(head: &[u8; 12]) -> Option<&'static str> {
    if &head[4..8] == b"ftyp" {
        Some(if &head[8..12] == b"qt  " { "mov" } else { "mp4" })
    } else if head[..4] == [0x1A, 0x45, 0xDF, 0xA3] {
        Some("webm") // or mkv: the EBML header's DocType says which
    } else if &head[..4] == b"RIFF" && &head[8..12] == b"AVI " {
        Some("avi")
    } else {
        None
    }
}

/// What [`check_container`] found: the shard extension, the sha256 of the bytes, and the frame
/// size of the video track where the container records it (mp4/mov: the sample description or
/// the track header; webm/mkv: the track's PixelWidth/PixelHeight; avi: the main header).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub ext: &'static str,
    pub sha256: String,
    pub picture: Option<(u64, u64)>,
}

/// Check the container structure of `len` bytes read from `src` (whose first bytes are `head`)
/// and hash them. Never decodes a frame. Beyond the structure, a container whose headers say it
/// has no frames (a video track of 0 samples, an empty `movi` list) or no video track at all (only
/// audio tracks) is rejected.
pub fn check_container(src: &mut dyn Read, len: u64, head: &[u8; 12], cancel: &AtomicBool) -> Result<Checked, String> {
    let Some(kind) = detect(head) else {
        return Err("not a recognised video container (mp4/mov start with an 'ftyp' box, webm/mkv with the EBML magic \
                    1A 45 DF A3, avi with RIFF....AVI)"
            .into());
    };
    let mut w = Walk::new(src, len, cancel);
    let (ext, picture) = match kind {
        "mp4" | "mov" => (kind, mp4(&mut w)?),
        "webm" => ebml(&mut w)?,
        _ => (kind, avi(&mut w)?),
    };
    if w.pos != len {
        return Err(format!("the structure ends at byte {}, the file has {len} bytes", w.pos));
    }
    Ok(Checked { ext, sha256: w.finish(), picture })
}

/// Headers larger than this are walked but not parsed for the frame size (a movie header of a long
/// video can hold megabytes of sample tables; the size is then left to the trainer's decoder).
const MAX_HEADER_PARSE: u64 = 64 << 20;

fn be32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4).map(|x| u32::from_be_bytes(x.try_into().unwrap()) as u64)
}

fn le32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4).map(|x| u32::from_le_bytes(x.try_into().unwrap()) as u64)
}

/// (type, payload) of each box in a payload.
type Boxes<'b> = Vec<(&'b [u8], &'b [u8])>;
/// A video track's frame size (width, height) where the headers record it.
type Picture = Option<(u64, u64)>;

/// The larger (by pixels) of a file's frame size so far and another video track's: the pixel limit holds
/// against the largest track.
fn larger(picture: Picture, (w, h): (u64, u64)) -> Picture {
    Some(match picture {
        Some((pw, ph)) if pw.saturating_mul(ph) >= w.saturating_mul(h) => (pw, ph),
        _ => (w, h),
    })
}

/// The boxes of an MP4 box's payload: (type, payload) each. `parent` names it in errors.
fn child_boxes<'b>(b: &'b [u8], parent: &str) -> Result<Boxes<'b>, String> {
    let mut out = Vec::new();
    let mut i = 0usize;
    // Fewer than 8 bytes left is padding (some writers end a list with a 4-byte zero terminator).
    while b.len() - i >= 8 {
        let typ = &b[i + 4..i + 8];
        let (size, header) = match be32(b, i).unwrap() {
            0 => ((b.len() - i) as u64, 8),
            1 => (b.get(i + 8..i + 16).map(|x| u64::from_be_bytes(x.try_into().unwrap())).unwrap_or(0), 16),
            n => (n, 8),
        };
        if size < header || size > (b.len() - i) as u64 {
            return Err(format!("corrupt: box '{}' inside '{parent}' declares {size} bytes, past its parent", fourcc(typ)));
        }
        out.push((typ, &b[i + header as usize..i + size as usize]));
        i += size as usize;
    }
    Ok(out)
}

fn child<'b>(boxes: &[(&[u8], &'b [u8])], typ: &[u8; 4]) -> Option<&'b [u8]> {
    boxes.iter().find(|(t, _)| *t == typ).map(|(_, p)| *p)
}

/// The movie header (`moov` payload): the frame size of its video tracks, and whether it records
/// that they have no samples. A fragmented movie (`mvex`) keeps its samples in `moof` boxes, so
/// its empty sample tables say nothing.
fn mp4_movie(moov: &[u8]) -> Result<Option<(u64, u64)>, String> {
    let top = child_boxes(moov, "moov")?;
    let fragmented = child(&top, b"mvex").is_some();
    let (mut tracks, mut video, mut samples, mut picture) = (0, 0, Some(0u64), None::<(u64, u64)>);
    for (_, trak) in top.iter().filter(|(t, _)| *t == b"trak") {
        tracks += 1;
        let tb = child_boxes(trak, "trak")?;
        let Some(mdia) = child(&tb, b"mdia") else { continue };
        let mb = child_boxes(mdia, "mdia")?;
        // hdlr: version/flags, pre_defined, then the handler type
        if child(&mb, b"hdlr").and_then(|h| h.get(8..12)) != Some(b"vide") {
            continue;
        }
        video += 1;
        let stbl = match child(&mb, b"minf").map(|m| child_boxes(m, "minf")).transpose()? {
            Some(minf) => child(&minf, b"stbl").map(|s| child_boxes(s, "stbl")).transpose()?,
            None => None,
        };
        // stsd: version/flags, entry count, then a visual sample entry: size, format, 6 reserved,
        // data reference index, 16 bytes of pre-defined/reserved, width and height (16 bits each)
        let coded = stbl.as_ref().and_then(|s| child(s, b"stsd")).and_then(|d| {
            let e = d.get(8 + 32..8 + 36)?;
            Some((u16::from_be_bytes([e[0], e[1]]) as u64, u16::from_be_bytes([e[2], e[3]]) as u64))
        });
        // tkhd: the display size, 16.16 fixed point after the matrix (version 1 has 64-bit times)
        let shown = child(&tb, b"tkhd").and_then(|t| {
            let at = if t.first() == Some(&1) { 88 } else { 76 };
            Some((be32(t, at)? >> 16, be32(t, at + 4)? >> 16))
        });
        if let Some((w, h)) = coded.filter(|&(w, h)| w > 0 && h > 0).or(shown.filter(|&(w, h)| w > 0 && h > 0)) {
            picture = larger(picture, (w, h));
        }
        // stsz / stz2: version/flags, sample size (or reserved + field size), sample count
        let count = stbl.as_ref().and_then(|s| child(s, b"stsz").or(child(s, b"stz2"))).and_then(|z| be32(z, 8));
        samples = match (samples, count) {
            (Some(a), Some(c)) => Some(a + c),
            _ => None,
        };
    }
    if tracks > 0 && video == 0 {
        return Err(format!("no video track: its {tracks} track(s) have no 'vide' handler (audio only?)"));
    }
    if video > 0 && samples == Some(0) && !fragmented {
        return Err("its video track has 0 samples: a video without frames".into());
    }
    Ok(picture)
}

fn fourcc(b: &[u8]) -> String {
    if b.iter().all(|c| (0x20..=0x7E).contains(c)) {
        String::from_utf8_lossy(b).to_string()
    } else {
        format!("{b:02x?}")
    }
}

/// MP4 / QuickTime: the top-level boxes, `ftyp` first, each size consistent with the file; a
/// `moov` (the movie header) and an `mdat` (the media data) among them. Returns the video frame
/// size the movie header records (see [`mp4_movie`]).
fn mp4(w: &mut Walk) -> Result<Option<(u64, u64)>, String> {
    let (mut moov, mut mdat, mut first) = (false, false, true);
    let mut picture = None;
    while w.pos < w.len {
        let start = w.pos;
        let h = w.take(8, "a box header")?;
        let size32 = u32::from_be_bytes(h[..4].try_into().unwrap());
        let typ = &h[4..8];
        if !typ.iter().all(|c| (0x20..=0x7E).contains(c)) {
            return Err(format!("corrupt: the box at byte {start} has type {}, not four characters", fourcc(typ)));
        }
        let name = fourcc(typ);
        let (size, header) = match size32 {
            0 => (w.len - start, 8), // to the end of the file
            1 => (u64::from_be_bytes(w.take(8, &format!("the 64-bit size of box '{name}'"))?[..].try_into().unwrap()), 16),
            s => (s as u64, 8),
        };
        if size < header {
            return Err(format!("corrupt: box '{name}' at byte {start} declares {size} bytes, less than its {header}-byte header"));
        }
        if first && typ != b"ftyp" {
            return Err(format!("the first box is '{name}', not 'ftyp'"));
        }
        first = false;
        mdat |= typ == b"mdat";
        let end = start.checked_add(size).ok_or_else(|| format!("corrupt: box '{name}' at byte {start} declares {size} bytes"))?;
        if typ == b"moov" && !moov && size - header <= MAX_HEADER_PARSE && end <= w.len {
            let body = w.take((size - header) as usize, "the 'moov' box")?;
            picture = mp4_movie(&body)?;
        }
        moov |= typ == b"moov";
        w.skip_to(end, &format!("box '{name}' at byte {start} ({size} bytes)"))?;
    }
    if !moov {
        return Err("no 'moov' box (the movie header): not a complete MP4".into());
    }
    if !mdat {
        return Err("no 'mdat' box (the media data): a video without frames".into());
    }
    Ok(picture)
}

/// An EBML variable-length integer: (value, unknown size). IDs keep their marker bits.
fn vint(w: &mut Walk, id: bool, what: &str) -> Result<(u64, bool), String> {
    let at = w.pos;
    let first = w.take(1, what)?[0];
    let n = first.leading_zeros() as usize + 1;
    if first == 0 || (id && n > 4) {
        return Err(format!("corrupt: invalid EBML {} at byte {at}", if id { "element ID" } else { "size" }));
    }
    let rest = w.take(n - 1, what)?;
    let mut v = if id { first as u64 } else { (first as u64) & (0xFFu64 >> n) };
    for b in &rest {
        v = (v << 8) | *b as u64;
    }
    let unknown = !id && v == (1u64 << (7 * n)) - 1;
    Ok((v, unknown))
}

/// An EBML variable-length integer in a buffer; returns it and the bytes it took.
fn vint_in(b: &[u8], id: bool) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let n = first.leading_zeros() as usize + 1;
    if first == 0 || n > 8 || b.len() < n {
        return None;
    }
    let mut v = if id { first as u64 } else { (first as u64) & (0xFFu64 >> n) };
    for x in &b[1..n] {
        v = (v << 8) | *x as u64;
    }
    Some((v, n))
}

const EBML_HEADER: u64 = 0x1A45_DFA3;
const DOC_TYPE: u64 = 0x4282;
const SEGMENT: u64 = 0x1853_8067;
const TRACKS: u64 = 0x1654_AE6B;
const CLUSTER: u64 = 0x1F43_B675;

const TRACK_ENTRY: u64 = 0xAE;
const TRACK_TYPE: u64 = 0x83;
const TRACK_VIDEO: u64 = 0xE0;
const PIXEL_WIDTH: u64 = 0xB0;
const PIXEL_HEIGHT: u64 = 0xBA;

/// The child elements (id, payload) of an EBML master element's payload.
fn ebml_children(b: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (id, a) = vint_in(&b[i..], true).ok_or("corrupt: a malformed element in the Tracks")?;
        let (size, n) = vint_in(&b[i + a..], false).ok_or("corrupt: a malformed element size in the Tracks")?;
        let start = i + a + n;
        let end = start
            .checked_add(usize::try_from(size).unwrap_or(usize::MAX))
            .filter(|&e| e <= b.len() && size != (1u64 << (7 * n)) - 1)
            .ok_or_else(|| format!("corrupt: element 0x{id:X} in the Tracks declares {size} bytes, past its parent"))?;
        out.push((id, &b[start..end]));
        i = end;
    }
    Ok(out)
}

fn ebml_uint(b: &[u8]) -> u64 {
    b.iter().take(8).fold(0, |v, x| (v << 8) | *x as u64)
}

/// The Tracks element's payload: the frame size of its video tracks. Tracks that all declare a
/// type and none of them video (type 1) make a file without a video track.
fn webm_tracks(tracks: &[u8]) -> Result<Option<(u64, u64)>, String> {
    let (mut entries, mut typed, mut video, mut picture) = (0, 0, 0, None::<(u64, u64)>);
    for (_, entry) in ebml_children(tracks)?.into_iter().filter(|(id, _)| *id == TRACK_ENTRY) {
        entries += 1;
        let c = ebml_children(entry)?;
        let kind = c.iter().find(|(id, _)| *id == TRACK_TYPE).map(|(_, v)| ebml_uint(v));
        typed += kind.is_some() as usize;
        let v = c.iter().find(|(id, _)| *id == TRACK_VIDEO).map(|(_, v)| *v);
        if kind != Some(1) && v.is_none() {
            continue;
        }
        video += 1;
        if let Some(v) = v {
            let vc = ebml_children(v)?;
            let get = |want: u64| vc.iter().find(|(id, _)| *id == want).map(|(_, x)| ebml_uint(x));
            if let (Some(w), Some(h)) = (get(PIXEL_WIDTH), get(PIXEL_HEIGHT)) {
                picture = larger(picture, (w, h));
            }
        }
    }
    if entries > 0 && typed == entries && video == 0 {
        return Err(format!("no video track: its {entries} track(s) are of other types (audio only?)"));
    }
    Ok(picture)
}

/// WebM / Matroska: the EBML header and its DocType (`webm` or `matroska`), then the Segment,
/// its size within the file and its top-level elements' sizes within it, a `Tracks` and a
/// `Cluster` among them. A live-written element of unknown size ends the size checks there.
/// Returns the extension and the video frame size the Tracks record.
fn ebml(w: &mut Walk) -> Result<(&'static str, Picture), String> {
    let (id, _) = vint(w, true, "the EBML header")?;
    if id != EBML_HEADER {
        return Err("missing the EBML header".into());
    }
    let (size, unknown) = vint(w, false, "the EBML header's size")?;
    if unknown || size > 4096 {
        return Err(format!("corrupt: the EBML header declares {} bytes", if unknown { "an unknown number of".into() } else { size.to_string() }));
    }
    let body = w.take(size as usize, "the EBML header")?;
    let mut doc: Option<String> = None;
    let mut i = 0;
    while i < body.len() {
        let (cid, a) = vint_in(&body[i..], true).ok_or("corrupt: an element of the EBML header is malformed")?;
        let (csize, b) = vint_in(&body[i + a..], false).ok_or("corrupt: an element of the EBML header is malformed")?;
        let start = i + a + b;
        let end = start.checked_add(csize as usize).filter(|&e| e <= body.len()).ok_or("corrupt: an element overruns the EBML header")?;
        if cid == DOC_TYPE {
            doc = Some(String::from_utf8_lossy(&body[start..end]).trim_end_matches('\0').to_string());
        }
        i = end;
    }
    let ext = match doc.as_deref() {
        Some("webm") => "webm",
        Some("matroska") => "mkv",
        Some(other) => return Err(format!("the EBML DocType is {other:?}, not \"webm\" or \"matroska\"")),
        None => return Err("the EBML header names no DocType".into()),
    };
    let (mut segment, mut tracks, mut cluster) = (false, false, false);
    let mut picture = None;
    while w.pos < w.len {
        let start = w.pos;
        let (id, _) = vint(w, true, "an element header")?;
        let (size, unknown) = vint(w, false, "an element size")?;
        if id != SEGMENT {
            if unknown {
                return Err(format!("corrupt: the element 0x{id:X} at byte {start} has an unknown size outside a Segment"));
            }
            let end = w.pos.checked_add(size).ok_or_else(|| format!("corrupt: element 0x{id:X} at byte {start}"))?;
            w.skip_to(end, &format!("element 0x{id:X} at byte {start} ({size} bytes)"))?;
            continue;
        }
        segment = true;
        let end = if unknown { w.len } else { w.pos.checked_add(size).ok_or_else(|| format!("corrupt: the Segment at byte {start}"))? };
        if end > w.len {
            return Err(format!("truncated: the Segment at byte {start} declares {size} bytes, past the end of the file ({} bytes)", w.len));
        }
        while w.pos < end {
            let cstart = w.pos;
            let (cid, _) = vint(w, true, "an element header in the Segment")?;
            let (csize, cunknown) = vint(w, false, "an element size in the Segment")?;
            tracks |= cid == TRACKS;
            cluster |= cid == CLUSTER;
            if cunknown {
                // A live-written Cluster: where it ends is not recorded, so sizes cannot be checked past it.
                w.skip_to(end, "the Segment")?;
                break;
            }
            let cend = w.pos.checked_add(csize).filter(|&e| e <= end).ok_or_else(|| {
                format!("truncated or corrupt: element 0x{cid:X} at byte {cstart} declares {csize} bytes, past the end of its Segment (byte {end})")
            })?;
            if cid == TRACKS && picture.is_none() && csize <= MAX_HEADER_PARSE {
                picture = webm_tracks(&w.take(csize as usize, "the Tracks")?)?;
            }
            w.skip_to(cend, &format!("element 0x{cid:X} at byte {cstart}"))?;
        }
    }
    if !segment {
        return Err("no Segment after the EBML header".into());
    }
    if !tracks {
        return Err("the Segment has no Tracks element".into());
    }
    if !cluster {
        return Err("the Segment has no Cluster (no frames): a video without frames".into());
    }
    Ok((ext, picture))
}

/// AVI: the `RIFF ... AVI ` chunk within the file, its chunks within it (`LIST hdrl`, the
/// header, and `LIST movi`, the frames, among them), then any OpenDML `RIFF ... AVIX` chunks.
/// Returns the frame size of the main header (`avih`).
fn avi(w: &mut Walk) -> Result<Option<(u64, u64)>, String> {
    let mut picture = None;
    let h = w.take(12, "the RIFF header")?;
    let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as u64;
    let riff_end = 8 + size;
    if riff_end > w.len {
        return Err(format!("truncated: the RIFF chunk declares {size} bytes, past the end of the file ({} bytes)", w.len));
    }
    let (mut hdrl, mut movi) = (false, false);
    while w.pos < riff_end {
        let start = w.pos;
        if riff_end - start < 8 {
            return Err(format!("corrupt: {} stray bytes at the end of the RIFF chunk", riff_end - start));
        }
        let c = w.take(8, "a chunk header")?;
        let id = fourcc(&c[..4]);
        let csize = u32::from_le_bytes(c[4..8].try_into().unwrap()) as u64;
        let data_end = w.pos + csize;
        if data_end > riff_end {
            return Err(format!("truncated or corrupt: chunk '{id}' at byte {start} declares {csize} bytes, past the end of the RIFF chunk (byte {riff_end})"));
        }
        if &c[..4] == b"LIST" {
            if csize < 4 {
                return Err(format!("corrupt: the LIST chunk at byte {start} has {csize} bytes"));
            }
            let t = w.take(4, "a LIST type")?;
            if &t[..] == b"movi" && csize == 4 {
                return Err(format!("its 'movi' list at byte {start} is empty: a video without frames"));
            }
            if &t[..] == b"hdrl" && !hdrl && csize - 4 <= MAX_HEADER_PARSE {
                // the first chunk of the header list is the main header: dwWidth and dwHeight at 32 and 36
                let body = w.take((csize - 4) as usize, "the 'hdrl' list")?;
                if body.get(..4) == Some(&b"avih"[..]) {
                    let (width, height) = (le32(&body, 8 + 32), le32(&body, 8 + 36));
                    picture = width.zip(height).filter(|&(w, h)| w > 0 && h > 0);
                }
            }
            hdrl |= &t[..] == b"hdrl";
            movi |= &t[..] == b"movi";
        }
        // Chunks are padded to an even size; a missing pad on the last one is tolerated.
        w.skip_to((data_end + (csize & 1)).min(riff_end), &format!("chunk '{id}' at byte {start}"))?;
    }
    if size & 1 == 1 && w.pos < w.len {
        w.skip_to(w.pos + 1, "the RIFF chunk's pad byte")?;
    }
    while w.pos < w.len {
        let start = w.pos;
        let x = w.take(12, "a RIFF header")?;
        if &x[..4] != b"RIFF" || &x[8..12] != b"AVIX" {
            return Err(format!("corrupt: unexpected data at byte {start} after the AVI RIFF chunk"));
        }
        let xsize = u32::from_le_bytes(x[4..8].try_into().unwrap()) as u64;
        w.skip_to(start + 8 + xsize + (xsize & 1), &format!("the RIFF AVIX chunk at byte {start}"))?;
    }
    if !hdrl {
        return Err("no 'hdrl' list (the AVI header)".into());
    }
    if !movi {
        return Err("no 'movi' list (the frames): a video without frames".into());
    }
    Ok(picture)
}

/// The build's scratch file for video bytes: each checked container file is copied in at its
/// own reserved range (by the thread that checked it, so many copies run at once), verified
/// against the sha256 of the check, and read back into the shards.
pub struct VideoBlob {
    file: File,
    path: PathBuf,
    next: AtomicU64,
}

/// Why a video could not be put into the blob.
pub enum PutError {
    /// The record is rejected with this reason (the file changed or broke since it was checked).
    Reject(String),
    /// Writing the scratch blob failed: the build stops.
    Output(PathBuf, std::io::Error),
    /// The build was interrupted.
    Cancelled,
}

impl VideoBlob {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        Ok(VideoBlob { file, path: path.to_path_buf(), next: AtomicU64::new(0) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Put bytes already in memory and checked (a frame) in; returns their offset.
    pub fn put_bytes(&self, b: &[u8]) -> Result<u64, PutError> {
        let at = self.next.fetch_add(b.len() as u64, Ordering::Relaxed);
        self.file.write_all_at(b, at).map_err(|e| PutError::Output(self.path.clone(), e))?;
        Ok(at)
    }

    /// Copy a checked video in; returns its offset. The bytes are hashed again as they are
    /// copied: a file that changed since it was checked is a reject, not a shard member.
    pub fn put(&self, v: &VideoFile, cancel: &AtomicBool) -> Result<u64, PutError> {
        let at = self.next.fetch_add(v.len, Ordering::Relaxed);
        let out = |e| PutError::Output(self.path.clone(), e);
        match &v.body {
            Body::Bytes(b) => self.file.write_all_at(b, at).map_err(out)?,
            Body::File(f) => {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0u64;
                while pos < v.len {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(PutError::Cancelled);
                    }
                    let k = ((v.len - pos) as usize).min(buf.len());
                    let n = read_at_most(f, &mut buf[..k], pos).map_err(|e| PutError::Reject(format!("video {} is unreadable: {e}", v.label.display())))?;
                    if n < k {
                        return Err(PutError::Reject(format!("video {} shrank while the build read it", v.label.display())));
                    }
                    h.update(&buf[..n]);
                    self.file.write_all_at(&buf[..n], at + pos).map_err(out)?;
                    pos += n as u64;
                }
                if hex(&h.finalize()) != v.sha256 {
                    return Err(PutError::Reject(format!(
                        "video {} changed while the build read it (its bytes differ from those checked)",
                        v.label.display()
                    )));
                }
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal MP4: ftyp, moov (with an mvhd stub), mdat.
    pub fn mp4_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |typ: &[u8; 4], body: &[u8]| {
            out.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
            out.extend_from_slice(typ);
            out.extend_from_slice(body);
        };
        put(b"ftyp", b"isom\0\0\x02\0isomiso2mp41");
        put(b"moov", b"\0\0\0\x10mvhd\0\0\0\0\0\0\0\0");
        put(b"mdat", &[7u8; 40]);
        out
    }

    fn ebml_el(id: &[u8], body: &[u8]) -> Vec<u8> {
        let mut v = id.to_vec();
        v.push(0x01); // 8-byte size
        v.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
        v.extend_from_slice(body);
        v
    }

    /// A minimal WebM (or Matroska): EBML header with the DocType, a Segment with Tracks and a Cluster.
    pub fn webm_bytes(doc: &str) -> Vec<u8> {
        let header = ebml_el(&[0x42, 0x82], doc.as_bytes());
        let mut seg = ebml_el(&[0x16, 0x54, 0xAE, 0x6B], &[0xAE, 0x80]);
        seg.extend(ebml_el(&[0x1F, 0x43, 0xB6, 0x75], &[0xE7, 0x81, 0x00]));
        let mut out = ebml_el(&[0x1A, 0x45, 0xDF, 0xA3], &header);
        out.extend(ebml_el(&[0x18, 0x53, 0x80, 0x67], &seg));
        out
    }

    /// A minimal AVI: RIFF AVI with LIST hdrl and LIST movi.
    pub fn avi_bytes() -> Vec<u8> {
        let list = |t: &[u8; 4], body: &[u8]| {
            let mut v = b"LIST".to_vec();
            v.extend_from_slice(&((4 + body.len()) as u32).to_le_bytes());
            v.extend_from_slice(t);
            v.extend_from_slice(body);
            v
        };
        let mut inner = b"AVI ".to_vec();
        inner.extend(list(b"hdrl", b"avih\x04\0\0\0abcd"));
        inner.extend(list(b"movi", b"00dc\x03\0\0\0xyz\0"));
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        out.extend(inner);
        out
    }

    fn check(b: &[u8]) -> Result<&'static str, String> {
        check_container(&mut Cursor::new(b), b.len() as u64, &head_of(b), &AtomicBool::new(false)).map(|c| {
            assert_eq!(c.sha256, image::sha256_hex(b));
            c.ext
        })
    }

    fn bx(typ: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(typ);
        v.extend_from_slice(body);
        v
    }

    /// An MP4 whose movie header has one track of `handler` ('vide', 'soun'): a `width` x `height`
    /// visual sample entry, `samples` samples; `mvex` makes it fragmented.
    fn mp4_with_track(handler: &[u8; 4], width: u16, height: u16, samples: u32, mvex: bool) -> Vec<u8> {
        let mut hdlr = vec![0u8; 8];
        hdlr.extend_from_slice(handler);
        hdlr.extend_from_slice(&[0u8; 13]);
        let mut entry = vec![0u8; 6 + 2 + 16];
        entry.extend_from_slice(&width.to_be_bytes());
        entry.extend_from_slice(&height.to_be_bytes());
        entry.extend_from_slice(&[0u8; 50]);
        let mut stsd = vec![0, 0, 0, 0, 0, 0, 0, 1];
        stsd.extend(bx(b"avc1", &entry));
        let mut stsz = vec![0u8; 8];
        stsz.extend_from_slice(&samples.to_be_bytes());
        let stbl = [bx(b"stsd", &stsd), bx(b"stsz", &stsz)].concat();
        let minf = bx(b"stbl", &stbl);
        let mdia = [bx(b"hdlr", &hdlr), bx(b"minf", &minf)].concat();
        let mut tkhd = vec![0u8; 76];
        tkhd.extend_from_slice(&((width as u32) << 16).to_be_bytes());
        tkhd.extend_from_slice(&((height as u32) << 16).to_be_bytes());
        let trak = [bx(b"tkhd", &tkhd), bx(b"mdia", &mdia)].concat();
        let mut moov = bx(b"mvhd", &[0u8; 8]);
        moov.extend(bx(b"trak", &trak));
        if mvex {
            moov.extend(bx(b"mvex", &[]));
        }
        [bx(b"ftyp", b"isom\0\0\x02\0isomiso2mp41"), bx(b"moov", &moov), bx(b"mdat", &[7u8; 40])].concat()
    }

    /// A track entry of `kind` (1 video, 2 audio) with more children `body`.
    fn track_entry(kind: u8, body: &[u8]) -> Vec<u8> {
        ebml_el(&[0xAE], &[ebml_el(&[0x83], &[kind]), body.to_vec()].concat())
    }

    /// A WebM whose Tracks payload is `tracks`, with one Cluster.
    fn webm_with_tracks(tracks: Vec<u8>) -> Vec<u8> {
        let mut seg = ebml_el(&[0x16, 0x54, 0xAE, 0x6B], &tracks);
        seg.extend(ebml_el(&[0x1F, 0x43, 0xB6, 0x75], &[0xE7, 0x81, 0x00]));
        [ebml_el(&[0x1A, 0x45, 0xDF, 0xA3], &ebml_el(&[0x42, 0x82], b"webm")), ebml_el(&[0x18, 0x53, 0x80, 0x67], &seg)].concat()
    }

    /// An AVI main header chunk (`avih`) of a `width` x `height` video.
    fn avi_main_header(width: u32, height: u32) -> Vec<u8> {
        let mut main = vec![0u8; 56];
        main[32..36].copy_from_slice(&width.to_le_bytes());
        main[36..40].copy_from_slice(&height.to_le_bytes());
        [b"avih".to_vec(), 56u32.to_le_bytes().to_vec(), main].concat()
    }

    /// An AVI whose `hdrl` list holds `hdrl` and whose `movi` list holds `movi`.
    fn avi_with(hdrl: &[u8], movi: &[u8]) -> Vec<u8> {
        let list = |t: &[u8; 4], body: &[u8]| [b"LIST".to_vec(), ((4 + body.len()) as u32).to_le_bytes().to_vec(), t.to_vec(), body.to_vec()].concat();
        let inner = [b"AVI ".to_vec(), list(b"hdrl", hdrl), list(b"movi", movi)].concat();
        [b"RIFF".to_vec(), (inner.len() as u32).to_le_bytes().to_vec(), inner].concat()
    }

    fn picture(b: &[u8]) -> Result<Option<(u64, u64)>, String> {
        check_container(&mut Cursor::new(b), b.len() as u64, &head_of(b), &AtomicBool::new(false)).map(|c| c.picture)
    }

    #[test]
    fn the_frame_size_is_read_from_the_headers_and_frameless_or_audio_only_files_are_rejected() {
        assert_eq!(picture(&mp4_with_track(b"vide", 640, 360, 3, false)), Ok(Some((640, 360))));
        assert_eq!(picture(&mp4_bytes()), Ok(None)); // no track recorded: no size, not a reject
        let e = picture(&mp4_with_track(b"vide", 640, 360, 0, false)).unwrap_err();
        assert!(e.contains("0 samples"), "{e}");
        // fragmented: the samples are in 'moof' boxes, so an empty sample table is no evidence
        assert_eq!(picture(&mp4_with_track(b"vide", 64, 48, 0, true)), Ok(Some((64, 48))));
        let e = picture(&mp4_with_track(b"soun", 0, 0, 9, false)).unwrap_err();
        assert!(e.contains("no video track"), "{e}");

        let tracks = [track_entry(2, &[]), track_entry(1, &ebml_el(&[0xE0], &[ebml_el(&[0xB0], &[0x07, 0x80]), ebml_el(&[0xBA], &[0x04, 0x38])].concat()))].concat();
        assert_eq!(picture(&webm_with_tracks(tracks)), Ok(Some((1920, 1080))));
        let e = picture(&webm_with_tracks(track_entry(2, &[]))).unwrap_err();
        assert!(e.contains("no video track"), "{e}");
        assert_eq!(picture(&webm_bytes("webm")), Ok(None));
        let avih = avi_main_header(320, 240);
        assert_eq!(picture(&avi_with(&avih, b"00dc\x03\0\0\0xyz\0")), Ok(Some((320, 240))));
        let e = picture(&avi_with(&avih, b"")).unwrap_err();
        assert!(e.contains("'movi' list") && e.contains("empty"), "{e}");
    }

    #[test]
    fn a_video_file_over_the_pixel_limit_is_rejected_from_its_headers() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("big.mp4"), mp4_with_track(b"vide", 8000, 8000, 1, false)).unwrap();
        let v = read(&VideoSrc::Path("big.mp4".into()), d.path(), 1 << 20, &mut [], &AtomicBool::new(false)).unwrap();
        let e = check_frames(&v, crate::config::ImageCheck::Structure, 1 << 20).unwrap_err();
        assert!(e.contains("8000x8000 = 64000000 pixels per frame") && e.contains("--max-image-pixels"), "{e}");
        assert!(check_frames(&v, crate::config::ImageCheck::Structure, 64_000_000).is_ok());
    }

    #[test]
    fn containers_are_recognised_and_hashed() {
        assert_eq!(check(&mp4_bytes()), Ok("mp4"));
        let mut mov = mp4_bytes();
        mov[8..12].copy_from_slice(b"qt  ");
        assert_eq!(check(&mov), Ok("mov"));
        assert_eq!(check(&webm_bytes("webm")), Ok("webm"));
        assert_eq!(check(&webm_bytes("matroska")), Ok("mkv"));
        assert_eq!(check(&avi_bytes()), Ok("avi"));
    }

    #[test]
    fn truncated_corrupt_and_foreign_bytes_are_rejected_with_the_reason() {
        for (name, b) in [("mp4", mp4_bytes()), ("webm", webm_bytes("webm")), ("avi", avi_bytes())] {
            for cut in [b.len() - 1, b.len() / 2, 13] {
                let e = check(&b[..cut]).unwrap_err();
                assert!(e.contains("truncated") || e.contains("corrupt") || e.contains("no "), "{name} cut at {cut}: {e}");
            }
            let mut extra = b.clone();
            extra.extend_from_slice(b"junk");
            assert!(check(&extra).is_err(), "{name} with trailing junk");
        }
        assert!(check(&webm_bytes("avi")).unwrap_err().contains("DocType is \"avi\""));
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        assert!(check(&png).unwrap_err().contains("not a recognised video container"));
        // A box whose size field was overwritten.
        let mut bad = mp4_bytes();
        bad[28..32].copy_from_slice(&2u32.to_be_bytes());
        assert!(check(&bad).unwrap_err().contains("less than its 8-byte header"));
        let mut garbled = mp4_bytes();
        garbled[32..36].copy_from_slice(&[0, 1, 2, 3]);
        assert!(check(&garbled).unwrap_err().contains("not four characters"));
        // No moov: the movie header is missing.
        let mut no_moov = mp4_bytes();
        no_moov[32..36].copy_from_slice(b"free");
        assert!(check(&no_moov).unwrap_err().contains("no 'moov'"));
    }

    #[test]
    fn no_cut_or_flipped_byte_panics() {
        // Every prefix and many single-byte changes of each container: an error or Ok, never a panic.
        let webm_video = webm_with_tracks(track_entry(1, &ebml_el(&[0xE0], &[ebml_el(&[0xB0], &[0x40]), ebml_el(&[0xBA], &[0x30])].concat())));
        let with_headers = [mp4_with_track(b"vide", 64, 48, 3, false), webm_video, avi_with(&avi_main_header(64, 48), b"00dc\x03\0\0\0xyz\0")];
        for b in [mp4_bytes(), webm_bytes("webm"), avi_bytes()].into_iter().chain(with_headers) {
            for cut in 0..=b.len() {
                let _ = check(&b[..cut]);
            }
            for at in 0..b.len() {
                for x in [0x01u8, 0x10, 0x80, 0xFF] {
                    let mut m = b.clone();
                    m[at] ^= x;
                    let _ = check(&m);
                }
            }
        }
    }

    #[test]
    fn frames_sort_in_natural_order() {
        let mut v = vec!["frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "frame_02.jpg", "a.png", "frame_100.jpg"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a.png", "frame_1.jpg", "frame_2.jpg", "frame_02.jpg", "frame_10.jpg", "frame_100.jpg"]);
        assert_eq!(natural_cmp("c01.jpeg", "c1.jpeg"), std::cmp::Ordering::Greater);
        assert_eq!(natural_cmp("x", "x"), std::cmp::Ordering::Equal);
    }

    #[test]
    fn a_folder_without_frames_an_over_limit_file_and_a_fifo_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("empty")).unwrap();
        std::fs::write(d.path().join("empty/notes.txt"), b"x").unwrap();
        let e = read(&VideoSrc::Path("empty".into()), d.path(), 1 << 20, &mut [], &AtomicBool::new(false)).unwrap_err();
        assert!(e.contains("holds no frame images"), "{e}");
        std::fs::write(d.path().join("a.mp4"), mp4_bytes()).unwrap();
        let e = read(&VideoSrc::Path("a.mp4".into()), d.path(), 10, &mut [], &AtomicBool::new(false)).unwrap_err();
        assert!(e.contains("over the limit of 10 (--max-video-bytes)"), "{e}");
        let ok = read(&VideoSrc::Path("a.mp4".into()), d.path(), 1 << 20, &mut [], &AtomicBool::new(false)).unwrap();
        assert_eq!((ok.sha256(), ok.bytes()), (image::sha256_hex(&mp4_bytes()).as_str(), mp4_bytes().len() as u64));
        let fifo = d.path().join("pipe.mp4");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let root = d.path().to_path_buf();
        std::thread::spawn(move || tx.send(read(&VideoSrc::Path("pipe.mp4".into()), &root, 1 << 20, &mut [], &AtomicBool::new(false)).map(|_| ())).unwrap());
        let res = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO blocked");
        assert!(res.unwrap_err().contains("not a regular file (a FIFO)"));
    }

    #[test]
    fn a_file_changed_after_its_check_is_not_copied_as_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.mp4");
        std::fs::write(&p, mp4_bytes()).unwrap();
        let VideoRead::File(v) = read(&VideoSrc::Path("a.mp4".into()), d.path(), 1 << 20, &mut [], &AtomicBool::new(false)).unwrap() else { panic!() };
        let blob = VideoBlob::create(&d.path().join("videos.bin")).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(blob.put(&v, &stop).ok(), Some(0));
        let mut changed = mp4_bytes();
        changed[60] ^= 1;
        std::fs::write(&p, &changed).unwrap();
        assert!(matches!(blob.put(&v, &stop), Err(PutError::Reject(why)) if why.contains("changed while the build read it")));
        let copied = std::fs::read(d.path().join("videos.bin")).unwrap();
        assert_eq!(&copied[..mp4_bytes().len()], &mp4_bytes()[..]);
    }
}
