import sys

from .headless import main

sys.exit(main())
