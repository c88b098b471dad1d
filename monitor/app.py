"""dsmonitor entry point (placeholder until the dashboard lands): prints a run's latest state."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    print("dsmonitor: the dashboard is not built yet", file=sys.stderr)
    return 0
