"""``python -m sdxl_client.cli``: the same as the ``sdxl`` command."""

import sys

from sdxl_client.cli import main

sys.exit(main())
