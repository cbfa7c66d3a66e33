//! `rust_pairs`: the data core of vpa.
//!
//! Multi-aspect preference annotations (VLFeedback, HelpSteer-style rated rows, pairwise rows)
//! are validated ([`layout`], [`image`]), deduplicated ([`dedup`]), Bradley-Terry-ranked ([`rank`]),
//! turned into preference pairs by a named strategy ([`select`]) and written into deterministic
//! WebDataset tar shards ([`shard`]) with a manifest and a report. [`build`] runs the pipeline.
//! The PyO3 layer (`python`, feature `python`) is a thin binding over these modules.

pub mod alloc;
pub mod config;
pub mod error;
pub mod image;
pub mod video;
pub mod regular;
pub mod layout;
pub mod record;
pub mod row;
pub mod container;
pub mod text;
pub mod dedup;
pub mod rank;
pub mod select;
pub mod report;
pub mod shard;
pub mod spill;
pub mod build;
pub mod manifest;
pub mod outdir;
pub mod ops;

#[cfg(feature = "python")]
mod python;
