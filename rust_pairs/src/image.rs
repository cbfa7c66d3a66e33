//! Image validation: read, hash (sha256 of the original bytes) and check that the file decodes.
//! Bytes are never re-encoded: what is validated here is what goes into the shard.

use crate::config::ImageCheck;
use sha2::{Digest, Sha256};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// Largest image accepted, in bytes; a guard against a wrong path pointing at a huge file.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct ImageFile {
    pub path: PathBuf,
    pub sha256: String,
    pub ext: &'static str,
    pub bytes: Vec<u8>,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// Resolve an image reference: absolute as is, else relative to `root`.
pub fn resolve(reference: &str, root: &Path) -> PathBuf {
    let p = Path::new(reference);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// Shard member extensions of the image types a build accepts (one per format, in this order);
/// exported to Python as `rust_pairs.IMAGE_EXTENSIONS` so the trainer reads exactly these.
pub const EXTENSIONS: [&str; 5] = ["jpg", "png", "webp", "gif", "bmp"];

fn extension_of(format: image::ImageFormat) -> Option<&'static str> {
    use image::ImageFormat as F;
    match format {
        F::Jpeg => Some("jpg"),
        F::Png => Some("png"),
        F::WebP => Some("webp"),
        F::Gif => Some("gif"),
        F::Bmp => Some("bmp"),
        _ => None,
    }
}

/// Read and hash an image; the format comes from its magic bytes, not its name.
pub fn read(path: &Path) -> Result<ImageFile, String> {
    // open + fstat + one read: per-file syscalls dominate for small images (so no stat before the
    // open, unlike regular::open). Opening a FIFO (or a device) must not wait for a writer; only
    // regular files are read (fstat below).
    let mut f = crate::regular::open_nonblocking(path)
        .map_err(|e| format!("image {} is missing or unreadable: {e}", path.display()))?;
    let meta = f.metadata().map_err(|e| format!("image {} is unreadable: {e}", path.display()))?;
    if let Some(what) = crate::regular::special_kind(meta.file_type()) {
        return Err(format!("image {} is not a regular file ({what}); only regular files are read", path.display()));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(format!("image {} is {} bytes, over the {} byte limit", path.display(), meta.len(), MAX_IMAGE_BYTES));
    }
    // Read exactly the stat'ed length: no zero-filled buffer, no extra read to find EOF.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, meta.len()), &mut bytes)
        .map_err(|e| format!("image {} is unreadable: {e}", path.display()))?;
    if (bytes.len() as u64) < meta.len() {
        return Err(format!("image {} shrank while it was read", path.display()));
    }
    from_bytes(bytes, path.to_path_buf())
}

/// Hash and type image bytes (read from a file, or embedded in a row); `label` names it in
/// messages. The format comes from the magic bytes.
pub fn from_bytes(bytes: Vec<u8>, label: PathBuf) -> Result<ImageFile, String> {
    let path = label;
    if bytes.is_empty() {
        return Err(format!("image {} is empty", path.display()));
    }
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(format!("image {} is {} bytes, over the {} byte limit", path.display(), bytes.len(), MAX_IMAGE_BYTES));
    }
    let format = image::guess_format(&bytes).map_err(|_| format!("image {} is not a recognised image format", path.display()))?;
    let ext = extension_of(format)
        .ok_or_else(|| format!("image {} has unsupported format {format:?} (jpeg, png, webp, gif, bmp)", path.display()))?;
    Ok(ImageFile { sha256: sha256_hex(&bytes), path, ext, bytes })
}

/// Check the image: a full decode, the container structure, or the header only (see
/// [`ImageCheck`]). In every mode the pixel count is read from the header first and an image of
/// more than `max_pixels` is rejected before anything is decoded (a decompression bomb: a small
/// file that decodes to gigabytes). `Decode` also runs the structure check, so it is never less
/// strict (a decoder pads a JPEG cut after its scan header with grey).
pub fn check(img: &ImageFile, mode: ImageCheck, max_pixels: u64) -> Result<(), String> {
    let reader = || {
        image::ImageReader::new(Cursor::new(&img.bytes[..]))
            .with_guessed_format()
            .map_err(|e| format!("image {} cannot be opened: {e}", img.path.display()))
    };
    // A JPEG whose header segments are all of the common kinds is read here (a tenth of the
    // cost: the decoder builds lookup tables from every Huffman table); anything else goes to the
    // decoder, whose verdict and message stand.
    let fast = if img.ext == "jpg" { jpeg_header(&img.bytes) } else { None };
    let (w, h) = match fast {
        Some(d) => d,
        None => reader()?.into_dimensions().map_err(|e| format!("image {} does not decode: {e}", img.path.display()))?,
    };
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(format!(
            "image {} is {w}x{h} = {pixels} pixels, over the limit of {max_pixels} (--max-image-pixels; a decompression bomb?)",
            img.path.display()
        ));
    }
    let structure = || match img.ext {
        "jpg" => jpeg_structure(&img.bytes),
        "png" => png_structure(&img.bytes),
        _ => trailer_structure(img.ext, &img.bytes),
    };
    let res = match mode {
        ImageCheck::Header => Ok(()),
        ImageCheck::Structure => structure(),
        ImageCheck::Decode => structure().and_then(|()| {
            let mut r = reader()?;
            let mut limits = image::Limits::default();
            limits.max_image_width = Some(w);
            limits.max_image_height = Some(h);
            r.limits(limits);
            r.decode().map(|_| ()).map_err(|e| e.to_string())
        }),
    };
    res.map_err(|e| format!("image {} does not decode: {e}", img.path.display()))
}

/// JPEG: markers from SOI through a frame header (non-zero size) to scan data, and an EOI at the
/// end. Catches truncated and mangled files without an entropy decode.
pub fn jpeg_structure(b: &[u8]) -> Result<(), String> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("missing JPEG start-of-image marker".into());
    }
    let mut i = 2;
    let mut frame = false;
    loop {
        while i < b.len() && b[i] != 0xFF {
            i += 1; // tolerate junk between segments, as decoders do
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1; // fill bytes
        }
        if i >= b.len() {
            return Err("truncated JPEG: no scan data".into());
        }
        let m = b[i];
        i += 1;
        match m {
            0xD9 => return Err("JPEG ends before any scan data".into()),
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        if i + 2 > b.len() {
            return Err("truncated JPEG segment header".into());
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 || i + len > b.len() {
            return Err(format!("truncated JPEG segment 0x{m:02X}"));
        }
        if matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC) {
            if len < 8 {
                return Err("JPEG frame header too short".into());
            }
            let h = u16::from_be_bytes([b[i + 3], b[i + 4]]);
            let w = u16::from_be_bytes([b[i + 5], b[i + 6]]);
            if w == 0 || h == 0 {
                return Err(format!("JPEG frame has size {w}x{h}"));
            }
            frame = true;
        }
        if m == 0xDA {
            if !frame {
                return Err("JPEG scan before any frame header".into());
            }
            let end = b.iter().rposition(|&x| x != 0).unwrap_or(0);
            if end < i + len || b[end] != 0xD9 || b[end - 1] != 0xFF {
                return Err("truncated JPEG: no end-of-image marker".into());
            }
            return Ok(());
        }
        i += len;
    }
}

/// The dimensions of a JPEG whose header (SOI through the SOS segment) holds only APP0, COM, DQT,
/// DHT, DRI, a baseline/extended/progressive Huffman frame header and a scan header, each passing
/// every check the decoder (`zune-jpeg`, through `image`) makes on it when it reads the headers:
/// segment lengths, quantisation table precision and slot, Huffman class, slot, symbol count and
/// code-tree validity (and DC symbols <= 15), frame precision 8, non-zero size, 1-4 components
/// with valid sampling factors and table numbers, scan components that exist once each, spectral
/// and approximation ranges. `None` when anything else is met (fill bytes, other APPn or markers,
/// any failed check): the caller then asks the decoder, so this never accepts a header the
/// decoder rejects (`jpeg_header_agrees_with_the_decoder` checks that on mutated headers).
pub fn jpeg_header(b: &[u8]) -> Option<(u32, u32)> {
    let u16_at = |i: usize| -> Option<usize> { Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize) };
    if b.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut i = 2;
    let mut frame: Option<((u32, u32), Vec<u8>)> = None;
    loop {
        if *b.get(i)? != 0xFF {
            return None;
        }
        let m = *b.get(i + 1)?;
        let len = u16_at(i + 2)?;
        let seg = b.get(i + 4..i + 2 + len)?; // the segment after its length field
        if len < 2 {
            return None;
        }
        match m {
            0xE0 if len >= 8 => {}
            0xFE => {}
            0xDD if len == 4 => {}
            0xDB => {
                let mut q = seg;
                while !q.is_empty() {
                    let (precision, slot) = ((q[0] >> 4) as usize, q[0] & 15);
                    let need = 64 * (precision + 1) + 1;
                    if precision > 1 || slot > 3 || need > q.len() {
                        return None;
                    }
                    q = &q[need..];
                }
            }
            0xC4 => {
                let mut t = seg;
                while t.len() > 16 {
                    let (class, slot) = (t[0] >> 4, t[0] & 15);
                    if class > 1 || slot > 3 {
                        return None;
                    }
                    let counts = &t[1..17];
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    if n > 256 || n > t.len() - 17 {
                        return None;
                    }
                    // Canonical codes must fit their lengths (none all ones), as in the decoder.
                    let mut code = 0u32;
                    for (l, &c) in counts.iter().enumerate() {
                        code += c as u32;
                        if code > 0 && code >= 1 << (l + 1) {
                            return None;
                        }
                        code <<= 1;
                    }
                    if class == 0 && t[17..17 + n].iter().any(|&s| s > 15) {
                        return None;
                    }
                    t = &t[17 + n..];
                }
                if !t.is_empty() {
                    return None;
                }
            }
            0xC0..=0xC2 => {
                if frame.is_some() || seg.len() < 6 || seg[0] != 8 {
                    return None;
                }
                let (h, w, n) = (u16::from_be_bytes([seg[1], seg[2]]), u16::from_be_bytes([seg[3], seg[4]]), seg[5] as usize);
                if w == 0 || h == 0 || !(1..=4).contains(&n) || len != 8 + 3 * n {
                    return None;
                }
                let mut ids = Vec::with_capacity(n);
                for c in seg[6..6 + 3 * n].chunks(3) {
                    let (hs, vs) = (c[1] >> 4, c[1] & 15);
                    if hs > 4 || vs > 4 || !hs.is_power_of_two() || vs == 0 || c[2] > 3 {
                        return None;
                    }
                    ids.push(c[0]);
                }
                frame = Some(((w as u32, h as u32), ids));
            }
            0xDA => {
                let (dims, ids) = frame.as_ref()?;
                let ns = *seg.first()? as usize;
                if !(1..=4).contains(&ns) || len != 6 + 2 * ns {
                    return None;
                }
                let comps: Vec<u8> = (0..ns).map(|k| seg[1 + 2 * k]).collect();
                for (k, id) in comps.iter().enumerate() {
                    if comps[..k].contains(id) || !ids.contains(id) {
                        return None;
                    }
                }
                let (ss, se, a) = (seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]);
                if ss > 63 || se > 63 || a >> 4 > 13 || a & 15 > 13 {
                    return None;
                }
                return Some(*dims);
            }
            _ => return None,
        }
        i += 2 + len;
    }
}

/// PNG: signature, IHDR first (non-zero size), every chunk's CRC, at least one IDAT, IEND last.
pub fn png_structure(b: &[u8]) -> Result<(), String> {
    const SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !b.starts_with(SIG) {
        return Err("missing PNG signature".into());
    }
    let mut i = SIG.len();
    let (mut first, mut idat) = (true, false);
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let kind = &b[i + 4..i + 8];
        if i + 12 + len > b.len() {
            return Err(format!("truncated PNG chunk {}", String::from_utf8_lossy(kind)));
        }
        let crc = u32::from_be_bytes(b[i + 8 + len..i + 12 + len].try_into().unwrap());
        if crc32fast::hash(&b[i + 4..i + 8 + len]) != crc {
            return Err(format!("PNG chunk {} fails its CRC", String::from_utf8_lossy(kind)));
        }
        if first {
            if kind != b"IHDR" || len != 13 {
                return Err("PNG does not start with IHDR".into());
            }
            let w = u32::from_be_bytes(b[i + 8..i + 12].try_into().unwrap());
            let h = u32::from_be_bytes(b[i + 12..i + 16].try_into().unwrap());
            if w == 0 || h == 0 {
                return Err(format!("PNG has size {w}x{h}"));
            }
            first = false;
        }
        idat |= kind == b"IDAT";
        if kind == b"IEND" {
            return if idat { Ok(()) } else { Err("PNG has no image data (IDAT)".into()) };
        }
        i += 12 + len;
    }
    Err("truncated PNG: no IEND chunk".into())
}

/// GIF must end with its trailer; RIFF (WebP) and BMP sizes must fit the file.
fn trailer_structure(ext: &str, b: &[u8]) -> Result<(), String> {
    let ok = match ext {
        "gif" => b.iter().rposition(|&x| x != 0).is_some_and(|e| b[e] == 0x3B),
        "webp" => b.len() >= 12 && u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize + 8 <= b.len(),
        "bmp" => b.len() >= 6 && u32::from_le_bytes(b[2..6].try_into().unwrap()) as usize <= b.len(),
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("truncated {ext} file")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_written_extension_is_exported() {
        use image::ImageFormat as F;
        let mut written: Vec<_> = F::all().filter_map(extension_of).collect();
        let mut exported = EXTENSIONS.to_vec();
        written.sort_unstable();
        exported.sort_unstable();
        assert_eq!(written, exported);
    }

    fn png_bytes() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(4, 3, image::Rgb([200, 10, 10]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn reads_checks_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.png");
        std::fs::write(&good, png_bytes()).unwrap();
        let img = read(&good).unwrap();
        assert_eq!(img.ext, "png");
        assert_eq!(img.sha256, sha256_hex(&png_bytes()));
        check(&img, ImageCheck::Decode, 1 << 20).unwrap();

        let truncated = dir.path().join("t.png");
        let b = png_bytes();
        std::fs::write(&truncated, &b[..b.len() / 2]).unwrap();
        let t = read(&truncated).unwrap();
        assert!(check(&t, ImageCheck::Decode, 1 << 20).unwrap_err().contains("does not decode"));

        assert!(check(&t, ImageCheck::Structure, 1 << 20).unwrap_err().contains("does not decode"));
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(9, 7, image::Rgb([1, 2, 3])).write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        jpeg_structure(&jpeg).unwrap();
        assert!(jpeg_structure(&jpeg[..jpeg.len() - 2]).unwrap_err().contains("end-of-image"));
        assert!(jpeg_structure(&jpeg[..jpeg.len() - 10]).is_err());
        assert!(jpeg_structure(&jpeg[..40]).is_err());
        let mut png = png_bytes();
        png_structure(&png).unwrap();
        let mid = png.len() / 2;
        png[mid] ^= 0x55;
        assert!(png_structure(&png).unwrap_err().contains("CRC"));

        let text = dir.path().join("x.jpg");
        std::fs::write(&text, b"not an image").unwrap();
        assert!(read(&text).unwrap_err().contains("not a recognised image format"));
        assert!(read(&dir.path().join("missing.png")).unwrap_err().contains("missing"));
        assert_eq!(resolve("/abs/x.png", Path::new("/root")), PathBuf::from("/abs/x.png"));
        assert_eq!(resolve("rel/x.png", Path::new("/root")), PathBuf::from("/root/rel/x.png"));
    }

    /// A PNG whose IHDR claims `w`x`h`, with valid CRCs and one tiny IDAT: passes the structure check.
    fn png_claiming(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend(data);
            out.extend(&body);
            out.extend(crc32fast::hash(&body).to_be_bytes());
        };
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        chunk(b"IEND", &[]);
        out
    }

    #[test]
    fn pixel_limit_holds_in_every_mode() {
        let bomb = from_bytes(png_claiming(100_000, 100_000), "bomb.png".into()).unwrap();
        png_structure(&bomb.bytes).unwrap(); // the container itself is well-formed
        let small = from_bytes(png_bytes(), "small.png".into()).unwrap();
        for mode in [ImageCheck::Structure, ImageCheck::Header, ImageCheck::Decode] {
            let e = check(&bomb, mode, 89_478_485).unwrap_err();
            assert!(e.contains("100000x100000") && e.contains("--max-image-pixels"), "{mode:?}: {e}");
            check(&small, mode, 12).unwrap();
            assert!(check(&small, mode, 11).unwrap_err().contains("over the limit of 11"), "{mode:?}");
        }
    }

    #[test]
    fn decode_is_at_least_as_strict_as_structure() {
        let mut jpeg = Vec::new();
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 7]))
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        // Cut right after the scan header (SOS segment): no entropy-coded data, no EOI.
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let len = u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]) as usize;
        let cut = from_bytes(jpeg[..sos + 2 + len].to_vec(), "cut.jpg".into()).unwrap();
        assert!(check(&cut, ImageCheck::Structure, 1 << 20).is_err());
        assert!(check(&cut, ImageCheck::Decode, 1 << 20).unwrap_err().contains("end-of-image"));
    }

    #[test]
    fn jpeg_header_agrees_with_the_decoder() {
        let decoder = |b: &[u8]| image::ImageReader::new(Cursor::new(b)).with_guessed_format().unwrap().into_dimensions().ok();
        let mut jpegs = Vec::new();
        for (w, h, q) in [(9u32, 7u32, 90u8), (64, 48, 75), (96, 96, 30)] {
            let mut j = Vec::new();
            let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, (x ^ y) as u8]));
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut j, q).encode_image(&img).unwrap();
            jpegs.push(j);
        }
        let mut gray = Vec::new();
        image::GrayImage::from_pixel(5, 3, image::Luma([9])).write_to(&mut Cursor::new(&mut gray), image::ImageFormat::Jpeg).unwrap();
        jpegs.push(gray);
        let mut accepted = 0;
        for j in &jpegs {
            // The common case takes the fast path, with the decoder's dimensions.
            assert_eq!(jpeg_header(j), decoder(j), "unmodified");
            assert!(jpeg_header(j).is_some());
            // Every single-byte change in the header: never accepted where the decoder refuses.
            let sos = j.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap() + 16;
            for at in 0..sos.min(j.len()) {
                for x in [0x01u8, 0x02, 0x08, 0x10, 0x40, 0x80, 0xFF, 0x0F] {
                    let mut m = j.clone();
                    m[at] ^= x;
                    if let Some(d) = jpeg_header(&m) {
                        accepted += 1;
                        assert_eq!(decoder(&m), Some(d), "byte {at} ^ {x:#x}");
                    }
                }
            }
            for cut in 0..sos.min(j.len()) {
                if let Some(d) = jpeg_header(&j[..cut]) {
                    assert_eq!(decoder(&j[..cut]), Some(d), "cut at {cut}");
                }
            }
        }
        assert!(accepted > 1000, "the mutations exercise the fast path ({accepted})");
    }

    #[test]
    fn a_fifo_is_rejected_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // On a thread with a deadline: a regression blocks in open() forever, failing instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read(&fifo)).unwrap());
        let res = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO blocked");
        assert!(res.unwrap_err().contains("not a regular file (a FIFO)"));
    }
}
