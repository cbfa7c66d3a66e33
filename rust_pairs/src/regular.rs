//! Opening a user's file without ever blocking: only regular files are read.
//!
//! A path that names a FIFO would block `open()` until a writer comes (forever, in a build), and
//! a device or socket is no data file. Files are opened with `O_NONBLOCK` (for a regular file the
//! flag changes nothing), then `fstat`ed on the open descriptor, so a file swapped for a FIFO
//! after a `stat` is still caught.

use std::fs::{File, FileType, Metadata};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a non-regular file is, in words (`None` for a regular file).
pub fn special_kind(t: FileType) -> Option<&'static str> {
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "special"
    })
}

/// The error for a non-regular file: `not a regular file (a FIFO); <expected>`.
pub fn not_regular(what: &str, expected: &str) -> std::io::Error {
    std::io::Error::other(format!("not a regular file ({what}); {expected}"))
}

/// Open `path` for reading with `O_NONBLOCK | O_NOCTTY`, so a FIFO or device never blocks `open()`.
/// It checks nothing: the caller `fstat`s the file and reads it only if it is regular.
pub fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

/// Open `path` for reading if it is a regular file; `expected` says what it should have been
/// (it ends the error for any other kind of file).
pub fn open(path: &Path, expected: &str) -> std::io::Result<(File, Metadata)> {
    // stat first: a directory cannot be opened for reading on every system, and the message is
    // clearer; the fstat below is the check that counts.
    if let Some(what) = std::fs::metadata(path).ok().and_then(|m| special_kind(m.file_type())) {
        return Err(not_regular(what, expected));
    }
    let f = open_nonblocking(path)?;
    let meta = f.metadata()?;
    if let Some(what) = special_kind(meta.file_type()) {
        return Err(not_regular(what, expected));
    }
    Ok((f, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("in.jsonl");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would wait for a writer forever.
        let e = open(&fifo, "expected a data file").unwrap_err().to_string();
        assert_eq!(e, "not a regular file (a FIFO); expected a data file");
        assert!(open(d.path(), "x").unwrap_err().to_string().contains("(a directory)"));
        assert!(open(Path::new("/dev/null"), "x").unwrap_err().to_string().contains("(a device)"));
        let f = d.path().join("ok.jsonl");
        std::fs::write(&f, "{}\n").unwrap();
        assert_eq!(open(&f, "x").unwrap().1.len(), 3);
    }
}
