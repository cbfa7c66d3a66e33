"""``python -m vpa_lightning.seva ARGS`` = ``vpa seva generate ARGS`` (e.g. ``torchrun -m vpa_lightning.seva``)."""

import sys

from vpa_lightning.cli import console_main

sys.exit(console_main(["seva", "generate", *sys.argv[1:]]))
