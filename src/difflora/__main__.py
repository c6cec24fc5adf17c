import sys

from difflora.cli import main

sys.exit(main())
