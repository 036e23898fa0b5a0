"""``python -m dksm``: the same command line as the ``dksm`` script."""

import sys

from dksm.cli.main import main

sys.exit(main())
