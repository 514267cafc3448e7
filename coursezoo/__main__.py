import sys

from coursezoo.cli import main

sys.exit(main())
