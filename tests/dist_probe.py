"""Launched by tests under `deepspeed --num_gpus 2`: trains through the public API, then each rank
writes what it holds (parameter shards, step counters) for the test to inspect."""

import json
import sys
from pathlib import Path

import torch

from dsdistill.config import load_config
from dsdistill.models import param_counts
from dsdistill.train import build_parser, open_session

args = build_parser().parse_args(sys.argv[1:])
with open_session(load_config(args.config, args.overrides)) as run:
    run.fit()
plan, student, teacher = run.plan, run.student, run.teacher.engine
t_total, t_local = param_counts(teacher.module)
s_total, s_local = param_counts(student.module)
info = {
    "rank": plan.rank,
    "world": plan.world,
    "teacher_total": t_total,
    "teacher_local": t_local,
    "student_total": s_total,
    "student_local": s_local,
    "global_steps": student.global_steps,
    "micro_steps": student.micro_steps,
    "teacher_grad_params": sum(p.requires_grad for p in teacher.module.parameters()),
    "teacher_training_mode": teacher.module.training,
}
Path(plan.run_dir, f"probe-rank{plan.rank}.json").write_text(json.dumps(info))
# the engine's logits on a fixed batch (every rank takes part in a ZeRO-3 forward), for the export check
ids = torch.stack([run.data.splits.eval[i]["input_ids"] for i in range(2)])
student.eval()
with torch.no_grad():
    logits = student(ids, valid=ids > -1)["logits"]
if plan.rank == 0:
    torch.save({"ids": ids, "logits": logits}, Path(plan.run_dir, "probe_logits.pt"))
