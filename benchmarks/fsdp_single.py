"""``train_distill.py`` in one plain process, with the RSS-by-phase report of benchmarks/fsdp_memhook.py.

The one-process reference of ``benchmarks/fsdp_memory.py``:

    MEM_REPORT=/tmp/mem PYTHONPATH=. .venv/bin/python benchmarks/fsdp_single.py --config run.yaml
"""

import sys

from benchmarks.fsdp_memhook import install

if __name__ == "__main__":
    install()
    from accel_distill.cli import main

    sys.exit(main())
