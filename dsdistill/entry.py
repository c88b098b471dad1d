"""The command line of a training process: `deepspeed dsdistill/train.py --config run.yaml [--set a.b=value ...]`
parses here, trains (or writes a teacher cache), and reports a user error on one line from the rank that
found it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dsdistill.config import load_config
from dsdistill.dist import this_rank
from dsdistill.errors import DistillError, PeerFailed, one_line
from dsdistill.preempt import EXIT_PREEMPTED


def add_config_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--config and its --set overrides: what every command that reads a run config takes."""
    p.add_argument("--config", required=required, default=None, help="run config (YAML or JSON)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. --set train.max_steps=100",
    )


def build_parser(prog: str = "dsdistill/train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distil a frozen teacher into a student with DeepSpeed.")
    add_config_arguments(p)
    p.add_argument(
        "--teacher-cache",
        metavar="DIR",
        default=None,
        help="instead of training, run the teacher over the run's data and write its top-k distributions to DIR",
    )
    p.add_argument("--top-k", type=int, default=128, help="with --teacher-cache: tokens kept per position (default 128)")
    p.add_argument(
        "--level-bits",
        type=_bits,
        default=None,
        help="with --teacher-cache: bits per kept probability (2..12), or auto (default: the fewest that add at most "
        "2%% to the top-k's truncation error on the first rows)",
    )
    p.add_argument("--shard-rows", type=int, default=64, help="with --teacher-cache: packed rows per shard file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _bits(text: str) -> Optional[int]:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits or auto, got {text!r}") from None


def report_error(err: DistillError) -> None:
    """Print a user error on one line, from the rank that found it (an error every rank raises alike is
    printed by rank 0 alone; a rank that stopped because another failed prints nothing)."""
    if isinstance(err, PeerFailed):
        return
    rank = this_rank()
    if rank == 0 or not err.everywhere:
        where = f"rank {rank}: " if rank != 0 else ""
        print(f"dsdistill: error: {where}{one_line(str(err))}", file=sys.stderr, flush=True)


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank went away (it reports its own error)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(
        k in text
        for k in (
            "connection closed",
            "connection reset",
            "broken pipe",
            "distbackenderror",
            "gloo",
            "nccl error",
            "socket timeout",
            "timed out",
        )
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.teacher_cache is not None:
            from dsdistill.teachers.cache_writer import write_teacher_cache

            write_teacher_cache(
                cfg, Path(args.teacher_cache), top_k=args.top_k, level_bits=args.level_bits, shard_rows=args.shard_rows
            )
            return 0
        from dsdistill.run.loop import train

        summary = train(cfg)
    except DistillError as e:
        report_error(e)
        return e.exit_code
    except (RuntimeError, OSError) as e:
        if not _lost_peer(e):
            raise
        print(
            f"dsdistill: error: rank {this_rank()}: stopped because another rank went away ({one_line(str(e))[:160]})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return EXIT_PREEMPTED if summary.reason == "interrupted" else 0
