import sys

from recstream.cli import main

sys.exit(main())
