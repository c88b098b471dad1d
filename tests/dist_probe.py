"""Launched by tests under `deepspeed --num_gpus 2`: trains through the public API, then each rank
writes what it holds (parameter shards, step counters) for the test to inspect."""
import json
import sys
from pathlib import Path

from dsdistill.config import load_config
from dsdistill.models import param_counts
from dsdistill.train import build_parser, train

args = build_parser().parse_args(sys.argv[1:])
summary = train(load_config(args.config, args.overrides))
run = summary["run"]
t_total, t_local = param_counts(run.teacher.module)
s_total, s_local = param_counts(run.student.module)
info = {
    "rank": run.rank, "world": run.world, "teacher_total": t_total, "teacher_local": t_local,
    "student_total": s_total, "student_local": s_local,
    "global_steps": run.student.global_steps, "micro_steps": run.student.micro_steps,
    "teacher_grad_params": sum(p.requires_grad for p in run.teacher.module.parameters()),
    "teacher_training_mode": run.teacher.module.training,
}
Path(run.run_dir, f"probe-rank{run.rank}.json").write_text(json.dumps(info))
