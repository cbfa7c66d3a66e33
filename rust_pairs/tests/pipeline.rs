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

/// A minimal MP4 (ftyp, moov, mdat) whose media data is `fill`.
fn mp4(fill: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (typ, body) in [(&b"ftyp"[..], b"isom\0\0\x02\0isomiso2mp41".to_vec()), (b"moov", b"\0\0\0\x10mvhd\0\0\0\0\0\0\0\0".to_vec()), (b"mdat", vec![fill; 64])] {
        out.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(typ);
        out.extend_from_slice(&body);
    }
    out
}

fn png(shade: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(6, 4, image::Rgb([shade, 9, 9])).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// Members of every sample of a build's shards: key -> (member suffix -> bytes).
fn members(out: &Path) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<u8>>> {
    let mut all = std::collections::BTreeMap::new();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    for s in manifest["shards"].as_array().unwrap() {
        let mut ar = tar::Archive::new(std::fs::File::open(out.join(s["path"].as_str().unwrap())).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().to_string();
            let (key, rest) = name.split_once('.').unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            all.entry(key.to_string()).or_insert_with(std::collections::BTreeMap::new).insert(rest.to_string(), data);
        }
    }
    all
}

#[test]
fn videos_build_into_samples_with_their_members_and_partitions_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("clip.mp4"), mp4(1)).unwrap();
    std::fs::write(d.join("other.mp4"), mp4(2)).unwrap();
    std::fs::write(d.join("cut.mp4"), &mp4(3)[..90]).unwrap();
    std::fs::write(d.join("still.png"), png(200)).unwrap();
    std::fs::create_dir(d.join("frames")).unwrap();
    for (name, shade) in [("frame_10.png", 10u8), ("frame_2.png", 2), ("frame_1.png", 1), ("notes.txt", 0)] {
        std::fs::write(d.join("frames").join(name), if name.ends_with(".png") { png(shade) } else { b"x".to_vec() }).unwrap();
    }
    std::fs::create_dir(d.join("empty")).unwrap();
    let swift = |content: &str, videos: &str, extra: &str| {
        format!(r#"{{"messages": [{{"role": "user", "content": "{content}"}}, {{"role": "assistant", "content": "Left."}}], "rejected_response": "Right."{extra}, "videos": {videos}}}"#)
    };
    let swift_rows = [
        swift("<image>Is this frame in <video>?", r#"["clip.mp4"]"#, r#", "images": ["still.png"]"#),
        swift("<image>Is this frame in <video>?", r#"["other.mp4"]"#, r#", "images": ["still.png"]"#), // other video: its own group
        swift("<image>Is this frame in <video>?", r#"["clip.mp4"]"#, r#", "images": ["still.png"]"#), // a duplicate
        swift("<video>Which way?", r#"["cut.mp4"]"#, ""),
        swift("<video>Which way?", r#"["empty"]"#, ""),
    ];
    std::fs::write(d.join("swift.jsonl"), swift_rows.join("\n")).unwrap();
    std::fs::write(d.join("mmrlhf.jsonl"), r#"{"video": "frames", "prompt": "What happens?", "chosen": "It darkens.", "rejected": "Nothing."}"#).unwrap();
    let cfg = |out: &str, part: (u64, u64)| BuildConfig {
        inputs: vec![d.join("swift.jsonl").to_string_lossy().to_string(), d.join("mmrlhf.jsonl").to_string_lossy().to_string()],
        out: d.join(out).to_string_lossy().to_string(),
        val_fraction: 0.0,
        partition: part,
        ..Default::default()
    };
    let m = build(&cfg("single", (0, 1))).unwrap();
    let c = &m.counts;
    assert!(c.balanced());
    assert_eq!((c.records_in, c.records_used, c.records_deduplicated, c.records_rejected), (6, 3, 1, 2));
    let frames_bytes: u64 = [1u8, 2, 10].iter().map(|s| png(*s).len() as u64).sum();
    assert_eq!((c.videos, c.video_bytes), (3, 2 * mp4(1).len() as u64 + frames_bytes));
    let rejects = std::fs::read_to_string(d.join("single/rejects.jsonl")).unwrap();
    assert!(rejects.contains(r#""line":4"#) && rejects.contains("truncated"), "{rejects}");
    assert!(rejects.contains(r#""line":5"#) && rejects.contains("holds no frame images"), "{rejects}");
    assert!(rejects.lines().all(|l| l.contains(r#""field":"videos[0]""#)), "{rejects}");
    assert_eq!(inspect(&d.join("single"), true).unwrap()["ok"], true);

    let samples = members(&d.join("single"));
    let mut seen = 0;
    for fields in samples.values() {
        let js: serde_json::Value = serde_json::from_slice(&fields["json"]).unwrap();
        let v = &js["videos"][0];
        if v["kind"] == "file" {
            let member = v["members"][0].as_str().unwrap();
            assert_eq!(member, "v0.mp4");
            assert!(fields[member] == mp4(1) || fields[member] == mp4(2));
            assert_eq!(v["sha256"].as_str().unwrap(), rust_pairs::image::sha256_hex(&fields[member]));
            // The image and the video keep their places in the prompt.
            assert_eq!(js["prompt"], "Is this frame in ?");
            assert_eq!((js["images"][0]["offset"].as_u64(), v["offset"].as_u64()), (Some(0), Some(17)));
            assert_eq!(fields["0.png"], png(200));
        } else {
            assert_eq!(v["kind"], "frames");
            let names: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
            assert_eq!(names, ["v0.f0000.png", "v0.f0001.png", "v0.f0002.png"]);
            assert_eq!([&fields[names[0]], &fields[names[1]], &fields[names[2]]], [&png(1), &png(2), &png(10)]); // natural order
            let digests: Vec<String> = [1u8, 2, 10].iter().map(|s| rust_pairs::image::sha256_hex(&png(*s))).collect();
            assert_eq!(v["sha256"].as_str().unwrap(), rust_pairs::image::sha256_hex(digests.join("\n").as_bytes()));
            assert!(js.get("images").unwrap().as_array().unwrap().is_empty());
        }
        seen += 1;
    }
    assert_eq!(seen, 3);

    for i in 0..3 {
        build(&cfg("parts", (i, 3))).unwrap();
    }
    let merged = merge(&[d.join("parts")], &d.join("parts")).unwrap();
    let mut counts = merged.counts.clone();
    counts.records_other_partitions = 0;
    assert_eq!(counts, m.counts);
    assert_eq!(inspect(&d.join("parts"), true).unwrap()["ok"], true);
}
