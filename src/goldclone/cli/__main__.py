import sys

from goldclone.cli.main import main

sys.exit(main())
