"""``python -m crosslayer``: the command line (``crosslayer.cli.main``).

Importing ``crosslayer.cli`` is cheap (torch is imported inside ``main``), so Ctrl-C during the
first second ends in one line and status 130, never a traceback.
"""

import sys

from crosslayer.cli import main

sys.exit(main())
