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
:data:`TOOLS`): ``vpa seva generate|rounds``, ``vpa eval``, ``vpa report``, ``vpa export``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TOOLS", "cli_main", "main"]

#: ``vpa <name> ...`` subcommands that are not LightningCLI ones: name -> (module, function).
#: Each function takes the remaining arguments as a list (``None`` = ``sys.argv``).
TOOLS: dict[str, tuple[str, str]] = {
    "seva": ("vpa_lightning.seva_cli", "main"),
    "eval": ("vpa_lightning.eval.cli", "main"),
    "report": ("vpa_lightning.eval.report", "main"),
    "export": ("vpa_lightning.export", "main"),
}


def run_tool(name: str, args: list[str]) -> Any:
    """Run the ``vpa <name>`` tool of :data:`TOOLS` with ``args``."""
    import importlib

    module, func = TOOLS[name]
    return getattr(importlib.import_module(module), func)(args)


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
    from lightning.pytorch.cli import LightningCLI

    from vpa_lightning.data.datamodule import PreferenceDataModule
    from vpa_lightning.module import VisionDPOModule

    from vpa_lightning.callbacks import ThroughputLog

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # throughput (tokens/s, pairs/s, samples/s, MFU on CUDA) in every run's logs
    defaults = dict(kwargs.get("trainer_defaults") or {})
    defaults.setdefault("callbacks", [ThroughputLog()])
    kwargs["trainer_defaults"] = defaults
    kwargs.setdefault("parser_kwargs", {"description": "Preference optimisation (DPO family) of vision-language models."})
    return LightningCLI(VisionDPOModule, PreferenceDataModule, args=args, run=run, **kwargs)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point: a :data:`TOOLS` subcommand, else LightningCLI."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        return run_tool(args[0], args[1:])
    return cli_main(args)


if __name__ == "__main__":
    main()
