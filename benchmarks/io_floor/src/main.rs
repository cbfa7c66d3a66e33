//! The least work any shard build of the benchmark set must do: read the annotations file, read
//! and sha256 every image file once (in parallel, as the real build does), and write as many
//! bytes as the build's shards hold into one output file while hashing them (as a shard is):
//! each image followed by an equal share of zeros standing for the tar headers, padding and
//! sample JSON (OUT_BYTES, the shards' total size; the image bytes alone without it). No
//! parsing, ranking or tar framing. Prints one JSON line: {"seconds": ..., "files": ..., ...}.

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Write;
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
    let args: Vec<String> = std::env::args().collect();
    let (ann, images, out, out_bytes) = match &args[..] {
        [_, ann, images, out] => (ann, images, out, None),
        [_, ann, images, out, n] => (ann, images, out, Some(n.parse::<u64>().expect("OUT_BYTES is an integer"))),
        _ => {
            eprintln!("usage: io_floor ANNOTATIONS IMAGE_DIR OUT [OUT_BYTES]");
            std::process::exit(2);
        }
    };
    let mut files = Vec::new();
    files_under(Path::new(images), &mut files);
    files.sort();
    let image_total: u64 = files.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let extra = out_bytes.map_or(0, |n| n.saturating_sub(image_total));
    let per_file = (extra / files.len().max(1) as u64) as usize;
    let zeros = vec![0u8; per_file];
    let t0 = std::time::Instant::now();
    let ann_bytes = std::fs::read(ann).expect("readable annotations").len();
    let mut w = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(out).expect("writable output"));
    let mut shard_hash = Sha256::new();
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
            shard_hash.update(b);
            w.write_all(b).expect("write");
            shard_hash.update(&zeros);
            w.write_all(&zeros).expect("write");
            total += b.len() + zeros.len();
        }
    }
    let rest = vec![0u8; (extra as usize).saturating_sub(per_file * files.len())];
    shard_hash.update(&rest);
    w.write_all(&rest).expect("write");
    total += rest.len();
    w.flush().expect("flush");
    drop(w);
    let secs = t0.elapsed().as_secs_f64();
    std::fs::remove_file(out).ok();
    let _ = shard_hash.finalize();
    println!(
        "{{\"seconds\": {secs}, \"files\": {}, \"image_bytes\": {image_total}, \"written_bytes\": {total}, \"annotation_bytes\": {ann_bytes}}}",
        files.len()
    );
}
