import sys

from qbnorm_cli.cli import main

sys.exit(main())
