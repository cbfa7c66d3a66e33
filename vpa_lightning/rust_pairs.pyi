"""Type stubs for the Rust extension ``vpa_lightning.rust_pairs``."""

__version__: str

class RustPairsError(Exception):
    """Base class of every error raised by rust_pairs."""

class ConfigError(RustPairsError):
    """A build option is invalid; the message names the flag."""

class InputFileError(RustPairsError):
    """An input file cannot be opened or read."""

class OutputError(RustPairsError):
    """Writing shards, manifest or spill files failed."""

class ManifestError(RustPairsError):
    """A manifest is missing, malformed or inconsistent."""

def build(config_json: str) -> str:
    """Build shards from a JSON object of build options; returns the manifest as JSON."""

def check_config(config_json: str) -> str:
    """Validate build options without building; returns the normalised options as JSON."""

def inspect(directory: str, verify_hashes: bool = True) -> str:
    """Verify a build's shards against its manifest; returns a JSON summary."""

def merge(directories: list[str], out: str) -> str:
    """Merge partition builds into ``out``; returns the merged manifest as JSON."""

def parse_aspect_weights(spec: str) -> list[tuple[str, float]]:
    """Parse an ``--aspects`` spec such as ``"Helpfulness=1,Ethics=0.5"``."""

def bradley_terry(n_items: int, comparisons: list[tuple[int, int, float]], alpha: float = 0.1) -> list[float]:
    """Bradley-Terry log-strengths from (winner, loser, weight) comparisons with L2 prior ``alpha``."""

def normalize_text(text: str) -> str:
    """The text normalisation used for deduplication."""

def strategies() -> list[tuple[str, str, float]]:
    """(name, description, default min-margin) of each pair selection strategy."""

def formats() -> list[str]:
    """Names of the input layouts ``--format`` accepts (``auto`` first)."""

def recipes() -> list[tuple[str, str]]:
    """(name, description) of each named seed recipe (``--recipe``)."""
