#!/usr/bin/env python3
"""`python scripts/path_patch.py ARGS` is `mechscope discover ARGS`; run with --help for the arguments."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without `pip install -e .`
from mechscope.cli import main  # noqa: E402

sys.exit(main(["discover", *sys.argv[1:]]))
