import sys

from crosslayer.cli import main

sys.exit(main())
