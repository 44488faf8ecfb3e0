"""A run's finding in one sentence: the formatting shared by the `headline(summary)` functions that every
command module defines beside its summary.

A headline states what the run found with its number, its 95% interval and n, read from the summary's
own fields (it never recomputes a number: the summary is the record, the headline its first line). The cli
puts it first in the summary (result.json and `--json`) and report.py opens each run's section with it.
Undefined values (null in the summary) read "undefined"; an interval is left out where the summary has none
or where it is a point (one prompt).

A new command adds, beside its summary (see mechscope.cli for the module pattern):

    def headline(summary: dict) -> str:
        # the finding in one sentence: ...
        from mechscope.findings import ci, count, num

        top = summary["top"][0]
        return (f"{top['edge']} carries {num(top['effect'])}{ci(top['ci'])} of the logit difference "
                f"({count(summary['n_prompts'], 'prompt')})")

and, if it runs in the demo (mechscope.demo.STEPS), its n field in tests/test_findings.py's N_FIELD.
"""
from __future__ import annotations


def num(x, digits: int = 2, signed: bool = False) -> str:
    """A summary number as text: `digits` decimals, never "-0.00", "undefined" for null."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
        return "undefined"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    if float(text) == 0:
        text = f"{0:.{digits}f}"
    return text


def ci(low, high=None, digits: int = 2, signed: bool = False) -> str:
    """' [low, high]' (a 95% interval), or '' where the summary has none or it is a single point.
    Accepts (low, high), a [low, high] pair, or a dict with ci_low / ci_high."""
    if high is None and isinstance(low, dict):
        low, high = low.get("ci_low"), low.get("ci_high")
    elif high is None and isinstance(low, (list, tuple)) and len(low) == 2:
        low, high = low
    if not all(isinstance(x, (int, float)) and x == x for x in (low, high)) or low == high:
        return ""
    return f" [{num(low, digits, signed)}, {num(high, digits, signed)}]"


def count(n, noun: str, plural: str | None = None) -> str:
    """'1 prompt', '50 prompts' (n as the summary has it)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
