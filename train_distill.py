"""Train one recipe: ``accelerate launch train_distill.py --config run.yaml [section.key=value ...]``."""

import sys

from accel_distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
