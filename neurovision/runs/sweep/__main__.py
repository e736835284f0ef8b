"""``python -m neurovision.runs.sweep <sweep.yaml>``: the same as ``neurovision sweep``."""

import sys

from neurovision.cli import setup_process
from neurovision.runs.sweep import main

setup_process()  # the torchvision fix (where needed) and console logging, before anything imports torchvision
sys.exit(main())
