"""Run the command line: `python -m keras_antman demo`."""

import sys

from keras_antman.cli import main

sys.exit(main())
