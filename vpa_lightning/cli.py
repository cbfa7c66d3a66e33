"""Command line of the trainer: ``LightningCLI`` over :class:`VisionDPOModule` and :class:`PreferenceDataModule`.

Usage (``python -m vpa_lightning.cli`` or, once the console script is
installed, ``vpa``)::

    python -m vpa_lightning.cli fit --config configs/demo.yaml
    python -m vpa_lightning.cli fit --config configs/demo.yaml --print_config
    python -m vpa_lightning.cli fit --help
    python -m vpa_lightning.cli validate --config configs/demo.yaml --ckpt_path last

Subcommands: ``fit``, ``validate``, ``test``, ``predict``. Every ``__init__``
argument of the two classes (and of the Trainer) is an option, documented from
the docstrings; the loss is chosen with ``--model.loss`` / ``model.loss.class_path``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cli_main", "main"]


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

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("parser_kwargs", {"description": "Preference optimisation (DPO family) of vision-language models."})
    return LightningCLI(VisionDPOModule, PreferenceDataModule, args=args, run=run, **kwargs)


def main() -> None:
    """Console-script entry point."""
    cli_main()


if __name__ == "__main__":
    main()
