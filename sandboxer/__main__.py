import sys

from sandboxer.cli import main

sys.exit(main())
