"""`python -m annstream` runs the annstream command."""

import sys

from annstream.cli import main

sys.exit(main())
