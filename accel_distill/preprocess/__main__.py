"""``python -m accel_distill.preprocess ...`` (see :mod:`accel_distill.preprocess.cli`)."""

from accel_distill.preprocess.cli import main

raise SystemExit(main())
