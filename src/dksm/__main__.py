import sys

from dksm.cli.main import main

sys.exit(main())
