import sys

from lit_prune.cli import main

sys.exit(main())
