"""Launched by tests under `deepspeed --num_gpus 2`: builds the run's session and samples fixed prompts with
fixed seeds from its student (ZeRO-3 in the test), then rank 0 writes the completions."""

import json
import sys
from pathlib import Path

from dsdistill.config import load_config
from dsdistill.rollout import StudentSampler
from dsdistill.train import build_parser, open_session

args = build_parser().parse_args(sys.argv[1:])
with open_session(load_config(args.config, args.overrides)) as run:
    cfg = run.plan.cfg
    sampler = StudentSampler(run.student, cfg.generation, eos=1, pad=2, vocab=run.plan.vocab)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    out = sampler.generate(prompts, seeds=[1, 2, 3], max_new=[12, 12, 12])
    if run.plan.rank == 0:
        Path(run.plan.run_dir, "samples.json").write_text(json.dumps(out))
