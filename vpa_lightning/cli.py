"""Command line of the trainer: ``LightningCLI`` over :class:`VisionDPOModule` and :class:`PreferenceDataModule`.

Usage (``python -m vpa_lightning.cli`` or, once the console script is
installed, ``vpa``)::

    python -m vpa_lightning.cli fit --config configs/demo.yaml
    python -m vpa_lightning.cli fit --config configs/demo.yaml --print_config
    python -m vpa_lightning.cli fit --help
    python -m vpa_lightning.cli validate --config configs/demo.yaml --ckpt_path last

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI). Every
``__init__`` argument of the two classes (and of the Trainer) is an option, documented
from the docstrings; the loss is chosen with ``--model.loss`` / ``model.loss.class_path``.

The other subcommands are separate tools behind the same ``vpa`` command (see
:data:`TOOLS`): ``vpa demo``, ``vpa seva generate|rounds``, ``vpa eval``, ``vpa report``,
``vpa export``.

On CUDA, ``fit``/``validate``/``test``/``predict`` run the caching allocator with ``expandable_segments:True``
(:func:`allocator_defaults`) unless ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` is set: a step's tensors
change size with every batch (packed rows of varying length), and expandable segments grow one mapping instead of
leaving blocks of old sizes that fragment the pool and force allocation retries.

Exit status (the console script is :func:`console_main`): 0 on success; 2 for a bad flag or
option value (the message names the flag: an unknown option, a value a class rejects, shards
that do not exist yet); 1 for a run that fails (one ``vpa <command>: error: ...`` line for the
trainer's own errors, a traceback for anything unexpected); 130 on Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

__all__ = ["COMMANDS", "TOOLS", "allocator_defaults", "cli_main", "console_main", "main", "overview"]

#: ``vpa <name> ...`` subcommands that are not LightningCLI ones: name -> (module, function).
#: Each function takes the remaining arguments as a list (``None`` = ``sys.argv``).
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("vpa_lightning.demo", "main"),
    "seva": ("vpa_lightning.seva.cli", "main"),
    "eval": ("vpa_lightning.eval.cli", "main"),
    "report": ("vpa_lightning.eval.report", "main"),
    "export": ("vpa_lightning.export", "main"),
    "sample": ("vpa_lightning.collect.cli", "sample_main"),
    "judge": ("vpa_lightning.collect.cli", "judge_main"),
    "serve": ("vpa_lightning.collect.cli", "serve_main"),
    "rounds": ("vpa_lightning.loop.cli", "main"),
}


def allocator_defaults(environ: dict[str, str] | None = None) -> str | None:
    """Set ``expandable_segments:True`` for PyTorch's CUDA caching allocator unless the user configured it
    (``PYTORCH_ALLOC_CONF``, or the older ``PYTORCH_CUDA_ALLOC_CONF``); returns the variable set, or ``None``.
    torch reads it when CUDA first allocates, so this runs before any model is built. torch < 2.9 knows only
    the older name."""
    import importlib.metadata
    import os

    env = os.environ if environ is None else environ
    if "PYTORCH_ALLOC_CONF" in env or "PYTORCH_CUDA_ALLOC_CONF" in env:
        return None
    try:
        major, minor = (int(x) for x in importlib.metadata.version("torch").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    name = "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"
    env[name] = "expandable_segments:True"
    return name


#: One line per command for ``vpa --help`` (the LightningCLI ones first).
COMMANDS: dict[str, str] = {
    "fit": "train a policy on preference shards (LightningCLI: --config YAML, every option documented in fit --help)",
    "validate": "one evaluation pass over the validation shards",
    "test": "one evaluation pass over the test shards",
    "predict": "per-pair rewards of a checkpoint over the test shards",
    "demo": "build the demo shards and train the tiny demo model end to end on CPU (--video: clips; --rounds N: on-policy rounds)",
    "seva": "SeVa: generate augmented-image pairs (seva generate) or run the rounds (seva rounds)",
    "eval": "evaluate a model or checkpoint on a benchmark (POPE, MME, MMBench, MVBench, MM-Vet, ...)",
    "report": "tables and plots of evaluation results",
    "export": "export a checkpoint's LoRA adapter or merged model in transformers' format",
    "sample": "sample K answers per prompt from a pool of VLMs (hf or an OpenAI-compatible server), resumable",
    "judge": "rate sampled answers (an OpenAI-compatible judge, a local VLM's rating probabilities, or rules)",
    "serve": "serve a local VLM behind an OpenAI-compatible /v1/chat/completions",
    "rounds": "on-policy rounds: sample with the policy, rate, rank, train, evaluate, repeat (resumable)",
}


def overview() -> str:
    """``vpa --help``: every command, each with ``--help`` of its own."""
    width = max(map(len, COMMANDS))
    lines = ["usage: vpa COMMAND [ARGS ...]", "", "Preference optimisation (DPO family) of vision-language models.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`vpa COMMAND --help` documents a command; `vpa-shard --help` the data core."]
    return "\n".join(lines)


def run_tool(name: str, args: list[str]) -> Any:
    """Run the ``vpa <name>`` tool of :data:`TOOLS` with ``args``."""
    import importlib

    module, func = TOOLS[name]
    return getattr(importlib.import_module(module), func)(args)


def _deepspeed_logs_to_stderr(args: list[str]) -> None:
    """DeepSpeed's logger writes to whatever ``sys.stdout`` is when it is first imported, and Lightning
    imports it while parsing a config that names its strategy: with ``--print_config`` its messages would
    land in the printed YAML. Import it first with stdout pointing at stderr, so they go there."""
    import contextlib
    import importlib.util

    if "deepspeed" in sys.modules or not any(a.startswith("--print_config") for a in args):
        return
    if importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def quiet_framework() -> None:
    """Hide framework messages a user cannot act on: Lightning's advertisements for its cloud products, its
    warning when ``args`` are given from Python while ``sys.argv`` holds the calling tool's own arguments (``vpa
    demo``, ``vpa rounds``), its use of a torch pytree API torch deprecated, and (output not on a terminal)
    transformers' progress bars."""
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    if not sys.stderr.isatty():  # transformers' loading/saving bars are a wall of carriage returns in a log file
        import importlib.util

        if importlib.util.find_spec("transformers") is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def cli_main(args: list[str] | None = None, run: bool = True, **kwargs: Any):
    """Build (and by default run) the ``LightningCLI``.

    Args:
        args: Command-line arguments (``None`` = ``sys.argv[1:]``). With ``run=True``
            the first one is the subcommand (``fit``/``validate``/``test``/``predict``).
        run: ``False`` only parses ``args`` (no subcommand, e.g. ``["--config", "x.yaml"]``)
            and instantiates model, data module and trainer without running anything.
        **kwargs: Passed to ``LightningCLI`` (e.g. ``trainer_defaults``).

    Returns:
        The ``LightningCLI`` (``.model``, ``.datamodule``, ``.trainer``, ``.config``).
    """
    _deepspeed_logs_to_stderr(sys.argv[1:] if args is None else args)
    quiet_framework()
    from lightning.pytorch.cli import LightningCLI

    from vpa_lightning.callbacks import EpochLine, GarbageCollection, ThroughputLog
    from vpa_lightning.data.datamodule import PreferenceDataModule
    from vpa_lightning.errors import UsageError
    from vpa_lightning.module import VisionDPOModule

    class VpaCLI(LightningCLI):
        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
            # --ckpt_path is loaded with weights_only=True unless the user passes --weights_only
            # false: a checkpoint must not run code when unpickled, whatever torch's default is
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if kwargs.get("weights_only") is None and "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
                kwargs["weights_only"] = True
            return kwargs

        def instantiate_classes(self) -> None:
            # a value an __init__ rejects is a bad option, like an unknown flag (exit status 2)
            try:
                super().instantiate_classes()
            except ValueError as exc:
                if isinstance(exc, UsageError):
                    raise
                raise UsageError(str(exc)) from exc
            # `--trainer.callbacks+=...ThroughputLog` appends to the default list: the user's replaces ours
            callbacks = self.trainer.callbacks
            for kind, default in ((ThroughputLog, default_log), (GarbageCollection, default_gc), (EpochLine, default_line)):
                if sum(isinstance(c, kind) for c in callbacks) > 1 and default in callbacks:
                    callbacks.remove(default)

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # throughput (tokens/s, pairs/s, samples/s, MFU on CUDA) in every run's logs; the garbage collector between steps
    defaults = dict(kwargs.get("trainer_defaults") or {})
    default_log, default_gc, default_line = ThroughputLog(), GarbageCollection(), EpochLine()
    # a progress bar on a terminal; elsewhere (a file, a CI log) one line per epoch instead of carriage returns
    defaults.setdefault("callbacks", [default_log, default_gc, default_line])
    defaults.setdefault("enable_progress_bar", sys.stdout.isatty())
    kwargs["trainer_defaults"] = defaults
    kwargs.setdefault("parser_kwargs", {"description": "Preference optimisation (DPO family) of vision-language models."})
    return VpaCLI(VisionDPOModule, PreferenceDataModule, args=args, run=run, **kwargs)


def main(argv: list[str] | None = None) -> Any:
    """``vpa ARGS`` from Python: a :data:`TOOLS` subcommand, else LightningCLI; returns what it returns."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return run_tool(args[0], args[1:])
    if not args or args[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    allocator_defaults()
    return cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


def _status(code: Any) -> int:
    """The exit status of a ``SystemExit`` code (``None`` = 0, a message = 1, as ``sys.exit`` does)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def console_main(argv: list[str] | None = None) -> int:
    """The ``vpa`` console script: runs :func:`main` and returns the exit status (see the module docstring)."""
    from vpa_lightning.errors import UsageError, VpaError

    args = list(sys.argv[1:] if argv is None else argv)
    prog = "vpa" + (f" {args[0]}" if args and not args[0].startswith("-") else "")
    try:
        main(argv)  # None: LightningCLI reads sys.argv itself (given both, it warns on every run)
    except SystemExit as exc:  # argparse / jsonargparse: --help (0), a bad flag (2)
        return _status(exc.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except VpaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:  # the data core's typed errors: a bad build option is a usage error
        from vpa_lightning.data.shards import ConfigError

        if isinstance(exc, ConfigError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        raise  # anything else: traceback, status 1
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
