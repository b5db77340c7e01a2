import sys

from latentsel.cli import main

sys.exit(main())
