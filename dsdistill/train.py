"""Distillation training: `deepspeed dsdistill/train.py --config run.yaml [--set a.b=value ...]`.

The script a launcher starts on every rank. The loop is dsdistill/run/loop.py, its parts run/build.py, the
command line dsdistill/entry.py; docs/architecture.md shows how they fit together.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Started as a script path (the deepspeed launcher does this): import this package, and keep this
    # directory off sys.path so our module names cannot shadow anything.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dsdistill.entry import build_parser, main  # noqa: E402
from dsdistill.preempt import EXIT_PREEMPTED  # noqa: E402
from dsdistill.run.loop import Session, Summary, open_session, train  # noqa: E402
from dsdistill.teachers.cache_writer import write_teacher_cache  # noqa: E402

__all__ = ["EXIT_PREEMPTED", "Session", "Summary", "build_parser", "main", "open_session", "train", "write_teacher_cache"]

if __name__ == "__main__":
    sys.exit(main())
