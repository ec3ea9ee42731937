import sys

from sandboxer.cli.main import main

sys.exit(main())
