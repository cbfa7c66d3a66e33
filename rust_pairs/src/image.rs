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
    let meta = std::fs::metadata(path).map_err(|e| format!("image {} is missing or unreadable: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("image {} is not a regular file", path.display()));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(format!("image {} is {} bytes, over the {} byte limit", path.display(), meta.len(), MAX_IMAGE_BYTES));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("image {} is unreadable: {e}", path.display()))?;
    if bytes.is_empty() {
        return Err(format!("image {} is empty", path.display()));
    }
    let format = image::guess_format(&bytes).map_err(|_| format!("image {} is not a recognised image format", path.display()))?;
    let ext = extension_of(format)
        .ok_or_else(|| format!("image {} has unsupported format {format:?} (jpeg, png, webp, gif, bmp)", path.display()))?;
    Ok(ImageFile { path: path.to_path_buf(), sha256: sha256_hex(&bytes), ext, bytes })
}

/// Check the image decodes (or, in header mode, that its header gives dimensions).
pub fn check(img: &ImageFile, mode: ImageCheck) -> Result<(), String> {
    let reader = image::ImageReader::new(Cursor::new(&img.bytes[..]))
        .with_guessed_format()
        .map_err(|e| format!("image {} cannot be opened: {e}", img.path.display()))?;
    let res = match mode {
        ImageCheck::Header => reader.into_dimensions().map(|_| ()),
        ImageCheck::Decode => reader.decode().map(|_| ()),
    };
    res.map_err(|e| format!("image {} does not decode: {e}", img.path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        check(&img, ImageCheck::Decode).unwrap();

        let truncated = dir.path().join("t.png");
        let b = png_bytes();
        std::fs::write(&truncated, &b[..b.len() / 2]).unwrap();
        let t = read(&truncated).unwrap();
        assert!(check(&t, ImageCheck::Decode).unwrap_err().contains("does not decode"));

        let text = dir.path().join("x.jpg");
        std::fs::write(&text, b"not an image").unwrap();
        assert!(read(&text).unwrap_err().contains("not a recognised image format"));
        assert!(read(&dir.path().join("missing.png")).unwrap_err().contains("missing"));
        assert_eq!(resolve("/abs/x.png", Path::new("/root")), PathBuf::from("/abs/x.png"));
        assert_eq!(resolve("rel/x.png", Path::new("/root")), PathBuf::from("/root/rel/x.png"));
    }
}
