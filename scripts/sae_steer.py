#!/usr/bin/env python3
"""`python scripts/sae_steer.py ARGS` is `mechscope sae-steer ARGS`; run with --help for the arguments."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without `pip install -e .`
from mechscope.cli import main  # noqa: E402

sys.exit(main(["sae-steer", *sys.argv[1:]]))
