//! The least work any shard build of the benchmark set must do: read the annotations file, read
//! and sha256 every image file once (in parallel, as the real build does), and write as many
//! bytes as the build's shards hold into one output file while hashing them (as a shard is):
//! each image followed by an equal share of zeros standing for the tar headers, padding and
//! sample JSON (OUT_BYTES, the shards' total size; the image bytes alone without it). No
//! parsing, ranking or tar framing. Prints one JSON line: {"seconds": ..., "files": ..., ...}.
//!
//! `--scratch N` (after the positional arguments): the floor of a build that writes its samples
//! in a shuffled order with bounded memory, as vpa does. The bytes read are cut into N equal
//! pieces (one per record), written in input order to a scratch file beside OUT, and read back
//! piece by piece (in parallel, 512 at a time) in a fixed pseudo-random order into the hashed
//! output. Still no decompression, parsing or framing.

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable image directory").flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let scratch_pieces: Option<usize> = match args.iter().position(|a| a == "--scratch") {
        Some(i) => {
            let n = args.get(i + 1).and_then(|n| n.parse().ok()).expect("--scratch N: N is an integer");
            args.drain(i..i + 2);
            Some(n)
        }
        None => None,
    };
    let (ann, images, out, out_bytes) = match &args[..] {
        [_, ann, images, out] => (ann, images, out, None),
        [_, ann, images, out, n] => (ann, images, out, Some(n.parse::<u64>().expect("OUT_BYTES is an integer"))),
        _ => {
            eprintln!("usage: io_floor ANNOTATIONS IMAGE_DIR OUT [OUT_BYTES] [--scratch N]");
            std::process::exit(2);
        }
    };
    let mut files = Vec::new();
    files_under(Path::new(images), &mut files);
    files.sort();
    let image_total: u64 = files.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let extra = out_bytes.map_or(0, |n| n.saturating_sub(image_total));
    let t0 = std::time::Instant::now();
    let ann_bytes = std::fs::read(ann).expect("readable annotations").len();
    let mut w = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(out).expect("writable output"));
    let mut shard_hash = Sha256::new();
    let mut total = match scratch_pieces {
        Some(n) => shuffled(&files, n.max(1), extra, Path::new(out), &mut w, &mut shard_hash),
        None => in_order(&files, extra, &mut w, &mut shard_hash),
    };
    // What the equal shares of zeros left of OUT_BYTES.
    let rest = vec![0u8; (image_total + extra).saturating_sub(total as u64) as usize];
    shard_hash.update(&rest);
    w.write_all(&rest).expect("write");
    total += rest.len();
    w.flush().expect("flush");
    drop(w);
    let secs = t0.elapsed().as_secs_f64();
    std::fs::remove_file(out).ok();
    let _ = shard_hash.finalize();
    let pieces = scratch_pieces.map_or(String::new(), |n| format!(", \"scratch_pieces\": {n}"));
    println!(
        "{{\"seconds\": {secs}, \"files\": {}, \"image_bytes\": {image_total}, \"written_bytes\": {total}, \"annotation_bytes\": {ann_bytes}{pieces}}}",
        files.len()
    );
}

/// Read and sha256 every file (in parallel, 512 at a time) and write each, in order, into `w`
/// (hashed), followed by its share of `extra` zeros. Returns the bytes written.
fn in_order(files: &[PathBuf], extra: u64, w: &mut impl Write, hash: &mut Sha256) -> usize {
    let zeros = vec![0u8; (extra / files.len().max(1) as u64) as usize];
    let mut total = 0usize;
    for chunk in files.chunks(512) {
        let read: Vec<(Vec<u8>, [u8; 32])> = chunk
            .par_iter()
            .map(|p| {
                let b = std::fs::read(p).expect("readable image");
                let h = Sha256::digest(&b).into();
                (b, h)
            })
            .collect();
        for (b, _) in &read {
            hash.update(b);
            w.write_all(b).expect("write");
            hash.update(&zeros);
            w.write_all(&zeros).expect("write");
            total += b.len() + zeros.len();
        }
    }
    total
}

/// Read and sha256 every file (in parallel), cut the bytes into `n` pieces written to a scratch
/// file in order, then read the pieces back in a pseudo-random order into `w` (hashed), each
/// followed by its share of `extra` zeros. Returns the bytes written.
fn shuffled(files: &[PathBuf], n: usize, extra: u64, out: &Path, w: &mut impl Write, hash: &mut Sha256) -> usize {
    let scratch_path = out.with_extension("scratch");
    let scratch = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&scratch_path).expect("writable scratch file");
    let mut sw = std::io::BufWriter::with_capacity(4 << 20, &scratch);
    let mut len = 0u64;
    for chunk in files.chunks(16) {
        let read: Vec<Vec<u8>> = chunk
            .par_iter()
            .map(|p| {
                let b = std::fs::read(p).expect("readable file");
                let _: [u8; 32] = Sha256::digest(&b).into();
                b
            })
            .collect();
        for b in &read {
            sw.write_all(b).expect("scratch write");
            len += b.len() as u64;
        }
    }
    sw.flush().expect("scratch flush");
    drop(sw);
    let piece = len.div_ceil(n as u64);
    // A fixed permutation: pieces sorted by a multiplicative hash of their index.
    let mut order: Vec<u64> = (0..n as u64).filter(|i| i * piece < len).collect();
    order.sort_by_key(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17));
    let zeros = vec![0u8; (extra / order.len().max(1) as u64) as usize];
    let mut total = 0usize;
    for batch in order.chunks(512) {
        let pieces: Vec<Vec<u8>> = batch
            .par_iter()
            .map(|&i| {
                let at = i * piece;
                let mut b = vec![0u8; piece.min(len - at) as usize];
                scratch.read_exact_at(&mut b, at).expect("scratch read");
                b
            })
            .collect();
        for b in &pieces {
            hash.update(b);
            w.write_all(b).expect("write");
            hash.update(&zeros);
            w.write_all(&zeros).expect("write");
            total += b.len() + zeros.len();
        }
    }
    std::fs::remove_file(&scratch_path).ok();
    total
}
