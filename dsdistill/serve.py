"""The teacher server on several ranks: `deepspeed --num_gpus N dsdistill/serve.py --model DIR --port P [--host H]`.

The script a launcher starts on every rank: the teacher sharded by ZeRO-3 over them, rank 0 answering HTTP
(dsdistill/teachers/sharded.py). Its options are `dsdistill teacher-serve`'s; on one device that command
alone does the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Started as a script path (the deepspeed launcher does this): import this package, and keep this
    # directory off sys.path so our module names cannot shadow anything.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dsdistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["teacher-serve", *sys.argv[1:]]))
