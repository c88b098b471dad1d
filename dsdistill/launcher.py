"""Per-node launcher that survives preemption: `python -m dsdistill.launcher --nproc-per-node G SCRIPT ARGS`.

It starts the node's ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set as DeepSpeed and
torch.distributed expect), then waits. Why not DeepSpeed's own per-node launcher: on SIGTERM it exits 1,
forwards the signal to ranks that already got it from the process group, and SIGKILLs them 30 seconds
later, so a slow step or save is lost. This one:
- forwards one SIGTERM per stop to its ranks (they count group + forwarded deliveries as one preemption);
- never kills a rank that is finishing its step and checkpoint, unless `--kill-after` says so;
- exits 75 when the ranks stopped for a preemption and saved, else with the first failing rank's status;
- when a rank crashes, stops the others (they would wait forever in a collective) and reports its status.
Its ranks watch it: if this launcher is killed outright, they save and exit instead of training on.
`launch.sh` uses it on a single node and under SLURM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from dsdistill.preempt import EXIT_PREEMPTED, STOP_SIGNALS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsdistill.launcher", description=__doc__.splitlines()[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (default $SLURM_NODEID or 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of rank 0's node")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on that node")
    p.add_argument(
        "--kill-after",
        type=float,
        default=0.0,
        help="after forwarding a stop, SIGKILL ranks still running this many seconds later (0: never; "
        "the scheduler's own kill is the limit)",
    )
    p.add_argument(
        "--crash-grace", type=float, default=30.0, help="after a rank crashed, seconds the others get to exit before SIGKILL"
    )
    p.add_argument("script", help="training script, e.g. dsdistill/train.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def _fail(msg: str) -> int:
    print(f"dsdistill.launcher: error: {msg}", file=sys.stderr, flush=True)
    return 2


class Launcher:
    """The ranks of one node, the stop requests forwarded to them, and the status to exit with."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.stop_sent_at: Optional[float] = None
        self.stop_signals = 0
        self.crashed: Optional[int] = None

    def start(self) -> None:
        a = self.args
        node_rank = a.node_rank if a.node_rank is not None else int(os.environ.get("SLURM_NODEID", "0"))
        world = a.nnodes * a.nproc_per_node
        for local in range(a.nproc_per_node):
            env = dict(
                os.environ,
                RANK=str(node_rank * a.nproc_per_node + local),
                LOCAL_RANK=str(local),
                WORLD_SIZE=str(world),
                LOCAL_SIZE=str(a.nproc_per_node),
                LOCAL_WORLD_SIZE=str(a.nproc_per_node),
                CROSS_RANK=str(node_rank),
                CROSS_SIZE=str(a.nnodes),
                MASTER_ADDR=a.master_addr,
                MASTER_PORT=str(a.master_port),
                PYTHONUNBUFFERED="1",
            )
            cmd = [sys.executable, "-u", a.script, f"--local_rank={local}", *a.script_args]
            self.procs.append(subprocess.Popen(cmd, env=env))

    def on_signal(self, signum, _frame) -> None:
        """Forward the stop to every rank still running, once per request (a repeat after the ranks' grace
        period is a deliberate second request, and the ranks exit at once on it)."""
        self.stop_signals += 1
        if self.stop_sent_at is None:
            name = signal.Signals(signum).name
            print(f"dsdistill.launcher: {name}: asking the ranks to finish their step and save", file=sys.stderr, flush=True)
        self.stop_sent_at = time.monotonic()
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        a = self.args
        crash_at: Optional[float] = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            failed = [c for c in codes if c not in (None, 0, EXIT_PREEMPTED)]
            if failed and crash_at is None:
                # a crashed rank leaves the others blocked in a collective: ask them to stop
                crash_at = time.monotonic()
                self.crashed = failed[0]
                for p in self.procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            now = time.monotonic()
            deadline = None
            if crash_at is not None:
                deadline = crash_at + a.crash_grace
            if self.stop_sent_at is not None and a.kill_after > 0:
                d = self.stop_sent_at + a.kill_after
                deadline = d if deadline is None else min(deadline, d)
            if deadline is not None and now > deadline:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
        return self.status([p.returncode for p in self.procs])

    def status(self, codes: list[int]) -> int:
        """0 when every rank completed; 75 when they stopped for a preemption and saved; else the first
        failure (a rank killed by a signal counts as 128 + signal, as a shell reports it)."""
        shell = [128 - c if c < 0 else c for c in codes]
        if self.crashed is not None:
            return 128 - self.crashed if self.crashed < 0 else self.crashed
        bad = [c for c in shell if c not in (0, EXIT_PREEMPTED)]
        if bad:
            return bad[0]
        return EXIT_PREEMPTED if EXIT_PREEMPTED in shell else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc_per_node < 1 or args.nnodes < 1:
        return _fail(f"--nproc-per-node {args.nproc_per_node} --nnodes {args.nnodes}: expected at least 1 each")
    if not os.path.isfile(args.script):
        return _fail(f"script '{args.script}' does not exist")
    if args.script_args and args.script_args[0] == "--":
        args.script_args = args.script_args[1:]
    launcher = Launcher(args)
    for sig in STOP_SIGNALS:
        signal.signal(sig, launcher.on_signal)
    launcher.start()
    return launcher.wait()


if __name__ == "__main__":
    sys.exit(main())
