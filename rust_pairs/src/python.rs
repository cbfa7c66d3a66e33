//! The thin PyO3 layer: JSON in, JSON out, the GIL released for the work, Rust errors mapped to
//! typed Python exceptions, and panics caught so none crosses into Python.

use crate::config::{parse_aspects, BuildConfig};
use crate::error::Error;
use crate::rank::{fit, Comparisons};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(rust_pairs, RustPairsError, PyException, "Base class of every error raised by rust_pairs.");
create_exception!(rust_pairs, ConfigError, RustPairsError, "A build option is invalid; the message names the flag.");
create_exception!(rust_pairs, InputFileError, RustPairsError, "An input file cannot be opened or read.");
create_exception!(rust_pairs, OutputError, RustPairsError, "Writing shards, manifest or spill files failed.");
create_exception!(rust_pairs, ManifestError, RustPairsError, "A manifest is missing, malformed or inconsistent.");

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Input { .. } => InputFileError::new_err(msg),
        Error::Output { .. } | Error::OutDir(_) => OutputError::new_err(msg),
        Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
        Error::Manifest(_) => ManifestError::new_err(msg),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
    RustPairsError::new_err(format!("internal error (please report): {what}"))
}

/// Run `f` without the GIL; map errors, and turn a panic into `RustPairsError`.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py),
        Err(p) => Err(panic_message(p)),
    })
}

fn config_from_json(config_json: &str) -> Result<BuildConfig, Error> {
    serde_json::from_str(config_json).map_err(|e| Error::Config(format!("invalid build options: {e}")))
}

/// Build shards from a JSON object of build options; returns the manifest as JSON.
#[pyfunction]
fn build(py: Python<'_>, config_json: &str) -> PyResult<String> {
    let cfg = config_from_json(config_json).map_err(to_py)?;
    // The build runs on its own thread while this one, briefly holding the GIL every 50 ms,
    // runs Python's signal handlers: Ctrl-C sets the build's cancel flag, the build stops within
    // a chunk's work and cleans up, and KeyboardInterrupt is raised here.
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = std::sync::Mutex::new(rx); // a Receiver is not Sync; detach needs a Send closure
    let flag = cancel.clone();
    let worker = std::thread::Builder::new()
        .name("rust_pairs-build".into())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| crate::build::build_cancellable(&cfg, &flag).map(|m| m.to_json())));
            let _ = tx.send(r);
        })
        .map_err(|e| RustPairsError::new_err(format!("cannot start the build thread: {e}")))?;
    let mut interrupt: Option<PyErr> = None;
    let result = loop {
        match py.detach(|| rx.lock().unwrap().recv_timeout(Duration::from_millis(50))) {
            Ok(r) => break r,
            Err(RecvTimeoutError::Timeout) => {
                if interrupt.is_none() {
                    if let Err(e) = py.check_signals() {
                        cancel.store(true, Ordering::Relaxed);
                        interrupt = Some(e);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => break Err(Box::new("the build thread ended without a result") as Box<dyn std::any::Any + Send>),
        }
    };
    let _ = worker.join();
    match (result, interrupt) {
        (Ok(Err(Error::Interrupted)), Some(e)) => Err(e),
        (Ok(r), _) => r.map_err(to_py),
        (Err(p), _) => Err(panic_message(p)),
    }
}

/// Check the options without building; returns the normalised options as JSON.
#[pyfunction]
fn check_config(config_json: &str) -> PyResult<String> {
    let cfg = config_from_json(config_json).and_then(|c| c.effective()).map_err(to_py)?;
    cfg.validate().map_err(to_py)?;
    Ok(serde_json::to_string(&cfg).unwrap())
}

/// Verify a build's shards against its manifest; returns a JSON summary.
#[pyfunction]
#[pyo3(signature = (directory, verify_hashes = true))]
fn inspect(py: Python<'_>, directory: PathBuf, verify_hashes: bool) -> PyResult<String> {
    run(py, move || crate::ops::inspect(&directory, verify_hashes).map(|v| v.to_string()))
}

/// Merge partition builds into `out`; returns the merged manifest as JSON.
#[pyfunction]
fn merge(py: Python<'_>, directories: Vec<PathBuf>, out: PathBuf) -> PyResult<String> {
    run(py, move || crate::ops::merge(&directories, &out).map(|m| m.to_json()))
}

/// Parse an `--aspects` spec into [(name, weight)].
#[pyfunction]
fn parse_aspect_weights(spec: &str) -> PyResult<Vec<(String, f64)>> {
    parse_aspects(spec).map_err(to_py)
}

/// Bradley-Terry log-strengths from (winner, loser, weight) comparisons with an L2 prior `alpha`.
#[pyfunction]
#[pyo3(signature = (n_items, comparisons, alpha = 0.1))]
fn bradley_terry(n_items: usize, comparisons: Vec<(usize, usize, f64)>, alpha: f64) -> PyResult<Vec<f64>> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ConfigError::new_err(format!("alpha must be > 0, got {alpha}")));
    }
    let mut c = Comparisons::new(n_items);
    for (w, l, x) in comparisons {
        if w >= n_items || l >= n_items {
            return Err(ConfigError::new_err(format!("comparison ({w}, {l}) names an item outside 0..{n_items}")));
        }
        if w == l {
            return Err(ConfigError::new_err(format!("comparison ({w}, {l}) compares an item with itself")));
        }
        if !(x.is_finite() && x >= 0.0) {
            return Err(ConfigError::new_err(format!("comparison ({w}, {l}) has weight {x}; weights must be finite and >= 0")));
        }
        c.win(w, l, x);
    }
    Ok(fit(&c, alpha))
}

/// Text normalisation used for dedup (NFKC, lowercase, collapsed whitespace, no `<image>`).
#[pyfunction]
fn normalize_text(text: &str) -> String {
    crate::text::normalize(text)
}

/// Names and one-line descriptions of the pair selection strategies.
#[pyfunction]
fn strategies() -> Vec<(String, String, f64)> {
    crate::select::STRATEGIES.iter().map(|s| (s.name.to_string(), s.help.to_string(), s.default_margin)).collect()
}

/// Names of the input layouts `--format` accepts (`auto` first).
#[pyfunction]
fn formats() -> Vec<String> {
    crate::config::Format::ALL.iter().map(|f| f.name().to_string()).collect()
}

/// (name, description) of each named seed recipe (`--recipe`).
#[pyfunction]
fn recipes() -> Vec<(String, String)> {
    crate::config::RECIPES.iter().map(|r| (r.name.to_string(), r.help.to_string())).collect()
}

#[pymodule]
fn rust_pairs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("IMAGE_EXTENSIONS", crate::image::EXTENSIONS.to_vec())?;
    m.add("RustPairsError", py.get_type::<RustPairsError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InputFileError", py.get_type::<InputFileError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("ManifestError", py.get_type::<ManifestError>())?;
    m.add_function(wrap_pyfunction!(build, m)?)?;
    m.add_function(wrap_pyfunction!(check_config, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(parse_aspect_weights, m)?)?;
    m.add_function(wrap_pyfunction!(bradley_terry, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_text, m)?)?;
    m.add_function(wrap_pyfunction!(strategies, m)?)?;
    m.add_function(wrap_pyfunction!(formats, m)?)?;
    m.add_function(wrap_pyfunction!(recipes, m)?)?;
    Ok(())
}
