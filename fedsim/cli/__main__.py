import sys

from fedsim.cli.main import main

sys.exit(main())
