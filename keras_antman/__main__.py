"""`python -m keras_antman COMMAND`: the `keras-antman` command line."""

import sys

from keras_antman.cli import main

sys.exit(main())
