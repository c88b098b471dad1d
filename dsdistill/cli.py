"""`dsdistill` command line: train, check, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from dsdistill.errors import ConfigError, DistillError


def _cmd_train(args) -> int:
    from dsdistill import train

    argv = ["--config", args.config] + sum((["--set", s] for s in args.overrides), [])
    return train.main(argv)


def _cmd_check(args) -> int:
    from dsdistill.config import load_config
    from dsdistill.preflight import describe, plan_dict, preflight

    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None and args.world_size < 1:
        raise DistillError(f"check: --world-size {args.world_size}: expected a positive number of ranks")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    plan, data = preflight(cfg, world=world, writing_cache=args.teacher_cache is not None)
    if args.json or args.json_to:
        import json

        text = json.dumps(plan_dict(plan, data), indent=2)
        if args.json:
            print(text)
            return 0
        Path(args.json_to).write_text(text + "\n", encoding="utf-8")  # launch.sh reads the run dir from it
    print(describe(plan, data))
    if args.show_example:
        from dsdistill.preflight import show_examples

        print("\n".join(show_examples(cfg, data.tokenizer, count=args.show_example)))
    print("check: ok")
    return 0


def _cmd_teacher_cache(args) -> int:
    from dsdistill import train

    argv = [
        "--config",
        args.config,
        "--teacher-cache",
        args.out,
        "--top-k",
        str(args.top_k),
        "--shard-rows",
        str(args.shard_rows),
    ]
    if args.level_bits is not None:
        argv += ["--level-bits", str(args.level_bits)]
    return train.main(argv + sum((["--set", s] for s in args.overrides), []))


def _cmd_teacher_serve(args) -> int:
    from dsdistill.config import load_config
    from dsdistill.teachers.server import serve

    if args.config is None and args.model is None:
        raise ConfigError("teacher-serve: give --model DIR, or --config with the teacher in teacher.path")
    cfg = load_config(args.config, args.overrides) if args.config is not None else None
    try:
        serve(
            cfg,
            host=args.host,
            port=args.port,
            model_dir=args.model,
            precision=args.precision,
            max_batch_tokens=args.max_batch_tokens,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C: the server's way to stop
    return 0


def _cmd_demo(args) -> int:
    from dsdistill.demo import run_demo

    return run_demo(run_dir=Path(args.run_dir), steps=args.steps, nprocs=args.nprocs, seed=args.seed, control=not args.no_control)


def _cmd_export(args) -> int:
    from dsdistill.export import export

    out = export(args.run_dir, args.out, tag=args.tag, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"exported the student to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_init_student(args) -> int:
    from dsdistill.init_student import init_student

    out = init_student(args.teacher, args.layers, args.out, trust_remote_code=args.trust_remote_code)
    print(f"init-student: wrote a student of the teacher's blocks {args.layers} to {out} (student.path: {out})")
    return 0


def _teacher_commands(sub, with_config) -> None:
    """`teacher-cache` and `teacher-serve`: the teacher run apart from training."""
    tc = sub.add_parser(
        "teacher-cache",
        help="run the teacher once over the run's data and store its top-k distributions (train later with teacher.cache)",
    )
    with_config(tc)
    tc.add_argument("--out", required=True, help="cache directory (a stopped write resumes in it)")
    tc.add_argument("--top-k", type=int, default=128, help="tokens kept per position (default 128)")
    tc.add_argument(
        "--level-bits", default=None, help="bits per kept probability, 2..12, or auto (the default: measured on the first rows)"
    )
    tc.add_argument("--shard-rows", type=int, default=64, help="packed rows per shard file (default 64)")
    tc.set_defaults(func=_cmd_teacher_cache)
    ts = sub.add_parser("teacher-serve", help="serve the config's teacher to runs elsewhere (train with teacher.url)")
    with_config(ts, required=False)
    ts.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="serve this model directory (with its tokenizer) instead of the config's teacher",
    )
    ts.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="default: the config's train.precision, else auto",
    )
    ts.add_argument(
        "--max-batch-tokens",
        type=int,
        default=65536,
        help="requests waiting together are scored in one forward of at most this many padded tokens (default 65536)",
    )
    ts.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    ts.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from a launcher
    ts.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    ts.set_defaults(func=_cmd_teacher_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsdistill", description="Distil a frozen teacher LLM into a student with DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)

    from dsdistill.entry import add_config_arguments as with_config

    t = sub.add_parser("train", help="train in this process (use `deepspeed dsdistill/train.py` for several ranks)")
    with_config(t)
    t.set_defaults(func=_cmd_train)
    c = sub.add_parser("check", help="validate a config against data, models and world size; print the plan")
    with_config(c)
    c.add_argument("--world-size", type=int, default=None, help="ranks the run will use (default: $WORLD_SIZE or 1)")
    c.add_argument("--json", action="store_true", help="print the whole plan as JSON (nothing else on stdout)")
    c.add_argument("--json-to", default=None, metavar="FILE", help="also write the plan as JSON to FILE (after the text)")
    c.add_argument(
        "--show-example",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="print the first N (default 1) examples of each source as rendered, with «» around the tokens that carry loss",
    )
    # what launch.sh passes on to train.py is checked first: these are accepted for a teacher-cache launch
    c.add_argument("--teacher-cache", default=None, help=argparse.SUPPRESS)
    c.add_argument("--top-k", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument("--level-bits", default=None, help=argparse.SUPPRESS)
    c.add_argument("--shard-rows", type=int, default=None, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_check)
    _teacher_commands(sub, with_config)
    d = sub.add_parser("demo", help="distil a tiny local teacher into a smaller student (CPU is enough)")
    d.add_argument("--run-dir", default="runs/demo", help="where the demo run writes (default runs/demo)")
    d.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    d.add_argument("--nprocs", type=int, default=2, help="ranks launched by the DeepSpeed launcher (default 2)")
    d.add_argument("--seed", type=int, default=0, help="train.seed of both runs (default 0)")
    d.add_argument("--no-control", action="store_true", help="skip the second run (the same student trained without the teacher)")
    d.set_defaults(func=_cmd_demo)
    x = sub.add_parser("export", help="write the trained student as a Hugging Face model (any ZeRO stage)")
    x.add_argument("run_dir", help="run directory with checkpoints")
    x.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    x.add_argument("--tag", default=None, help="checkpoint tag, e.g. step400 (default: latest)")
    x.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default fp32)")
    x.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the student's model code to run (never taken from the run directory)",
    )
    x.set_defaults(func=_cmd_export)
    i = sub.add_parser("init-student", help="make a student from a subset of the teacher's blocks (same width and head)")
    i.add_argument("--teacher", required=True, help="the teacher's model directory")
    i.add_argument(
        "--layers",
        required=True,
        help="blocks to keep, 1-based: every-K (every K-th and the last), first-N, last-N, or a list 1,3,5",
    )
    i.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    i.add_argument("--trust-remote-code", action="store_true", help="allow the teacher's model code to run")
    i.set_defaults(func=_cmd_init_student)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistillError as e:
        print(f"dsdistill: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
