"""Report builder: results directories -> seaborn figures -> index.html + report.md.

What it is: the `tandem report` command and its library (`build_report`, `compare`).
What it is not: a producer of results; it only reads what `tandem bench` / `tandem parity`
wrote (schemas in harness/records.py) and never changes an input directory.
"""

from __future__ import annotations

from reports.build import build_report
from reports.compare import compare

__all__ = ["build_report", "compare"]
