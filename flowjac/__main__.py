"""``python -m flowjac ...`` (and ``torchrun ... -m flowjac ...``): the command line of ``flowjac.cli``.

Explained in :ref:`sec_running_at_scale`.
"""
import sys

from flowjac.cli import main

if __name__ == "__main__":
    sys.exit(main())
