"""`python -m mechscope ARGS` is `mechscope ARGS`."""
import sys

from mechscope.cli import main

sys.exit(main())
