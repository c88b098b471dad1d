import sys

from dsdistill.cli import main

sys.exit(main())
