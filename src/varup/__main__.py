import sys

from varup.cli import main

sys.exit(main())
