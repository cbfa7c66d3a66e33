//! The whole pipeline from Rust alone: build, inspect, partition + merge.

use rust_pairs::build::build;
use rust_pairs::config::BuildConfig;
use rust_pairs::ops::{inspect, merge};
use std::io::Cursor;
use std::path::Path;

fn write_inputs(dir: &Path) -> String {
    let mut lines = Vec::new();
    for i in 0..12u8 {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([i * 20, 255 - i * 20, 7]));
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        std::fs::write(dir.join(format!("{i}.png")), png).unwrap();
        let comps: Vec<String> = (0..3)
            .map(|k| {
                let r = (i as usize + k * 2) % 5 + 1;
                format!(
                    r#"{{"model": "m{k}", "response": "answer {k} for {i}", "annotations": {{"Helpfulness": {{"Rating": "{r}"}}, "Visual Faithfulness": {{"Rating": {k}}}, "Ethical Considerations": {{"Rating": 5}}}}}}"#
                )
            })
            .collect();
        lines.push(format!(r#"{{"prompt": "Q{}", "img_path": "{i}.png", "completions": [{}]}}"#, i % 4, comps.join(",")));
    }
    lines.push(lines[3].clone()); // an exact duplicate
    lines.push("{not json".into());
    let path = dir.join("in.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.to_string_lossy().to_string()
}

#[test]
fn build_inspect_partition_merge() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(dir.path());
    let cfg = |out: &str, part: (u64, u64)| BuildConfig {
        inputs: vec![input.clone()],
        out: dir.path().join(out).to_string_lossy().to_string(),
        max_samples_per_shard: 3,
        val_fraction: 0.25,
        partition: part,
        ..Default::default()
    };
    let single = build(&cfg("single", (0, 1))).unwrap();
    let c = &single.counts;
    assert!(c.balanced());
    assert_eq!((c.records_in, c.records_deduplicated, c.records_rejected), (14, 1, 1));
    assert_eq!(c.groups, 12);
    assert!(single.shards.len() >= 4);
    let report = inspect(&dir.path().join("single"), true).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    for i in 0..3 {
        build(&cfg("parts", (i, 3))).unwrap();
    }
    let merged = merge(&[dir.path().join("parts")], &dir.path().join("parts")).unwrap();
    let mut counts = merged.counts.clone();
    counts.records_other_partitions = 0;
    assert_eq!(counts, single.counts);
    assert_eq!(inspect(&dir.path().join("parts"), true).unwrap()["ok"], true);
}
