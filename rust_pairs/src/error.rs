//! Errors that stop an operation. Bad *records* never become an `Error`: they are
//! rejected with file, line and reason (see [`crate::record::Reject`]) and the build goes on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A build option is invalid; the message names the flag.
    #[error("{0}")]
    Config(String),
    /// An input file cannot be opened or read (records inside it are not the problem).
    #[error("cannot read input {path}: {source}")]
    Input { path: PathBuf, source: std::io::Error },
    /// Writing the output (shards, manifest, spill files) failed.
    #[error("cannot write {path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
    /// A manifest is missing, malformed or inconsistent with others.
    #[error("{0}")]
    Manifest(String),
    /// The output directory is locked by another build, or holds files a build must not touch.
    #[error("{0}")]
    OutDir(String),
    /// The build was interrupted (Ctrl-C); it left no manifest and no shard of its own.
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn output(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Output { path: path.into(), source }
    }
    pub fn input(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Input { path: path.into(), source }
    }
}
