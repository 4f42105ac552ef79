import sys

from agacc.cli import main

sys.exit(main())
