"""``python -m retrieval.cli``: the ``retrieval`` command."""

import sys

from retrieval.cli import main

sys.exit(main())
