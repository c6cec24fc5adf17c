import sys

from difflora.cli.commands import main

sys.exit(main())
