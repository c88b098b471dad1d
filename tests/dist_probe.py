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
# the engine's logits on a fixed batch (every rank takes part in a ZeRO-3 forward), for the export check
import torch

ids = torch.stack([run.splits.eval[i]["input_ids"] for i in range(2)])
run.student.eval()
with torch.no_grad():
    logits = run.student(input_ids=ids)["logits"]
if run.rank == 0:
    torch.save({"ids": ids, "logits": logits}, Path(run.run_dir, "probe_logits.pt"))
