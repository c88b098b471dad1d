"""launch.sh (dry runs for each topology, a real two-process launch) and every file in ds_configs/."""

import contextlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsdistill.config import validate
from dsdistill.dist import free_port
from dsdistill.schema import METRICS_FILE, AlertRecord, RunEnd, RunStart, TrainRecord, parse_line
from dsdistill.train import open_session

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch.sh"
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def run_launch(args, tmp_path, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config_file(make_config, tmp_path):
    def write(**sections):
        p = tmp_path / "run.yaml"
        p.write_text(yaml.safe_dump(make_config(**sections)))
        return p

    return write


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    proc = subprocess.run([exe, str(LAUNCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dry_run_single_node(config_file, tmp_path):
    proc = run_launch(
        ["--config", str(config_file()), "--gpus-per-node", "2", "--dry-run", "--", "--set", "train.seed=7"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world size 2; global batch 8 sequences" in out  # the preflight plan for this world size
    assert "launch.sh: local, 1 node(s) x 2 GPU(s) = world 2" in out
    launcher = next(line for line in out.splitlines() if line.startswith("launcher: "))
    assert "-m dsdistill.launcher --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr" in launcher
    assert f"--master-port 29500 {ROOT}/dsdistill/train.py --config" in launcher
    assert launcher.endswith("--set checkpoint.resume=auto --set train.seed=7")
    assert sum(line.startswith("node ") for line in out.splitlines()) == 1


def test_dry_run_hostfile(config_file, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nworker-0 slots=4\nworker-1 slots=4\n")
    proc = run_launch(
        ["--config", str(config_file()), "--hostfile", str(hostfile), "--master-port", "6000", "--no-resume", "--dry-run"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "world size 8; global batch 32 sequences" in proc.stdout
    assert "launch.sh: pdsh, 2 node(s) x 4 GPU(s) = world 8, master worker-0:6000, resume never" in proc.stdout
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert len(nodes) == 2
    for rank, line in enumerate(nodes):
        assert line.startswith(f"node worker-{rank}: cd {tmp_path};")
        assert f"--node_rank={rank} --master_addr=worker-0 --master_port=6000" in line
        assert line.endswith("--set checkpoint.resume=never")
    assert "--hostfile" in proc.stdout and "--launcher pdsh" in proc.stdout


def test_dry_run_inside_slurm(config_file, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf \'gpu-a17\\ngpu-a18\\ngpu-a19\\n\'\n')
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[17-19]",
        "SLURM_GPUS_ON_NODE": "2",
    }
    proc = run_launch(["--config", str(config_file()), "--nodes", "2", "--dry-run"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "launch.sh: slurm, 2 node(s) x 2 GPU(s) = world 4, master gpu-a17:29500" in proc.stdout
    launcher = next(line for line in proc.stdout.splitlines() if line.startswith("launcher: "))
    assert launcher.startswith("launcher: srun --nodes 2 --ntasks-per-node 1")
    inner = shlex.split(launcher[len("launcher: ") :])[-1]  # what each node's shell runs
    assert inner.startswith("exec ") and '--node-rank "$SLURM_NODEID"' in inner and "-m dsdistill.launcher --nnodes 2" in inner
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert [n.split(":")[0] for n in nodes] == ["node gpu-a17", "node gpu-a18"]
    assert "--nnodes 2 --nproc-per-node 2 --node-rank 1 --master-addr gpu-a17" in nodes[1]


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"deepspeed": {"student": {"train_batch_size": 12, "zero_optimization": {"stage": 2}}}},
            "deepspeed.student: train_batch_size=12 conflicts with micro_batch_size*grad_accum*world_size (4*1*2)=8",
        ),
        ({"teacher": {"path": "/nonexistent/teacher"}}, "teacher.path: '/nonexistent/teacher' does not exist"),
    ],
)
def test_preflight_failure_stops_the_launch(config_file, tmp_path, sections, message):
    proc = run_launch(["--config", str(config_file(**sections)), "--gpus-per-node", "2"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dsdistill: error: {message}")
    assert "launch.sh:" not in proc.stdout  # nothing was launched


def test_unwritable_run_dir_stops_the_launch(config_file, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a directory")
    proc = run_launch(
        ["--config", str(config_file(output={"run_dir": str(tmp_path / "blocker" / "run")})), "--dry-run"], tmp_path
    )
    assert proc.returncode == 2 and "output.run_dir:" in proc.stderr and "is not writable" in proc.stderr


def test_bad_launch_arguments(config_file, tmp_path):
    assert (
        "--launcher 'mpich': expected local, deepspeed, pdsh"
        in run_launch(["--config", str(config_file()), "--launcher", "mpich"], tmp_path).stderr
    )
    assert "config file 'nope.yaml' does not exist" in run_launch(["--config", "nope.yaml"], tmp_path).stderr
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=4\n")
    assert (
        "every host needs the same slots="
        in run_launch(["--config", str(config_file()), "--hostfile", str(hostfile)], tmp_path).stderr
    )


@pytest.mark.slow
def test_real_two_process_launch_and_resume(config_file, tmp_path):
    cfg = config_file(train={"max_steps": 6, "micro_batch_size": 2}, eval={"every": 3, "max_batches": 1})
    port = str(free_port())
    first = run_launch(
        ["--config", str(cfg), "--gpus-per-node", "2", "--master-port", port, "--", "--set", "train.stop_at_step=3"], tmp_path
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    shutil.copytree(tmp_path / "run", tmp_path / "one-rank")  # paused at step 3 by two ranks, at ZeRO-2
    second = run_launch(["--config", str(cfg), "--gpus-per-node", "2", "--master-port", str(free_port())], tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout
    recs = [parse_line(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    starts = [r for r in recs if isinstance(r, RunStart)]
    assert [(s.world_size, s.resumed, s.step) for s in starts] == [(2, False, 0), (2, True, 3)]
    assert [t.step for t in recs if isinstance(t, TrainRecord)] == list(range(6))
    assert [e.reason for e in recs if isinstance(e, RunEnd)] == ["paused", "completed"]
    # DeepSpeed's CPU all-reduce buffers in /dev/shm are unlinked when the ranks exit (they leaked before)
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
    # the same checkpoint resumed by one rank at ZeRO-3, accumulating 2 micro-batches (the same rows per step):
    # the data position is re-sharded and the weights and moments carried, so it goes on as the two ranks did
    one = yaml.safe_load(cfg.read_text())
    one["output"]["run_dir"] = str(tmp_path / "one-rank")
    one["train"]["grad_accum"] = 2
    auto = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    one["deepspeed"] = {"student": {**dict.fromkeys(auto, "auto"), "zero_optimization": {"stage": 3}}}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(one)) as session:
        assert session.fit().reason == "completed"
    alone = [parse_line(line) for line in (tmp_path / "one-rank" / METRICS_FILE).read_text().splitlines()]
    note = next(a.message for a in alone if isinstance(a, AlertRecord) and a.code == "resume_carried")
    assert note.startswith("carried step3 into a new layout (ranks 2 -> 1, ZeRO stage 2 -> 3)")
    two = {t.step: t for t in recs if isinstance(t, TrainRecord)}
    for t in (t for t in alone if isinstance(t, TrainRecord) and t.step >= 3):
        assert t.lr == two[t.step].lr
        for name in ("kd", "lm"):  # per-token terms (contrastive draws its negatives from every rank: 4 rows there, 2 here)
            assert t.losses[name] == pytest.approx(two[t.step].losses[name], rel=1e-6, abs=1e-8), (t.step, name)


def test_ds_configs_are_documented():
    table = (ROOT / "ds_configs" / "README.md").read_text()
    assert len(DS_CONFIGS) == 5
    for path in DS_CONFIGS:
        json.loads(path.read_text())
        assert f"`{path.name}`" in table


@pytest.mark.parametrize("path", [p for p in DS_CONFIGS if not p.name.startswith("teacher")], ids=lambda p: p.name)
def test_every_student_config_trains_at_its_stage(make_config, tmp_path, path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    cfg = validate(
        make_config(
            train={"max_steps": 2, "grad_accum": 2},
            eval={"every": 0, "max_batches": 1},
            deepspeed={"student": str(path), "teacher": str(ROOT / "ds_configs" / "teacher_zero3.json")},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as session:
        session.fit()
    assert session.student.zero_optimization_stage() == stage and session.student.global_steps == 2
    assert session.teacher.engine.zero_optimization_stage() == 3
    if "offload" in path.name:
        assert session.student.zero_cpu_offload()
    recs = [parse_line(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert len(trains) == 2 and all(v == v for t in trains for v in t.losses.values())


# ------------------------------------------------------------------ hostile paths, environment, SLURM without scontrol

HOSTILE = "my runs/$(touch PWNED) `touch PWNED2`; echo x"


def _hostile_config(make_config, tmp_path) -> Path:
    folder = tmp_path / HOSTILE
    folder.mkdir(parents=True)
    cfg = folder / "run $(id).yaml"
    cfg.write_text(yaml.safe_dump(make_config()))
    return cfg


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text("#!/usr/bin/env bash\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


@pytest.mark.parametrize("mode", ["local", "hostfile", "slurm"])
def test_a_config_path_with_spaces_and_substitutions_neither_splits_nor_runs(make_config, tmp_path, mode):
    cfg = _hostile_config(make_config, tmp_path)
    out_dir = f"{tmp_path}/out $(touch PWNED3)"
    args, env = ["--config", str(cfg), "--dry-run", "--", "--set", f"output.run_dir={out_dir}"], {}
    if mode == "hostfile":
        (tmp_path / "hosts").write_text("n0 slots=1\nn1 slots=1\n")
        args = ["--hostfile", str(tmp_path / "hosts")] + args
    if mode == "slurm":
        fake = _fake_bin(tmp_path, "scontrol", 'printf "n0\\nn1\\n"\n')
        env = {
            "PATH": f"{fake}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n[0-1]",
            "SLURM_GPUS_ON_NODE": "1",
        }
    proc = run_launch(args, tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    launcher = next(line for line in proc.stdout.splitlines() if line.startswith("launcher: "))
    argv = shlex.split(launcher[len("launcher: ") :])
    if mode == "slurm":  # the inner shell's command line, as the node's bash will parse it
        argv = shlex.split(argv[-1].replace('"$SLURM_NODEID"', "0"))
    assert str(cfg) in argv and f"output.run_dir={out_dir}" in argv
    for line in proc.stdout.splitlines():
        if line.startswith("node "):
            assert str(cfg) in shlex.split(line.split(": ", 1)[1].split("; ")[-1])
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_slurm_inner_command_runs_without_executing_the_path(make_config, tmp_path):
    """A fake srun runs the per-node shell line for real; a fake python records the launcher's argv."""
    cfg = _hostile_config(make_config, tmp_path)
    record = tmp_path / "argv.txt"
    fake = _fake_bin(tmp_path, "scontrol", 'printf "n0\\n"\n')
    _fake_bin(tmp_path, "srun", 'while [[ "$1" != bash ]]; do shift; done; SLURM_NODEID=0 exec "$@"\n')
    _fake_bin(
        tmp_path,
        "py",
        f'if [[ "$2" == dsdistill.launcher ]]; then printf "%s\\n" "$@" > {shlex.quote(str(record))}; exit 0; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n',
    )
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n0",
        "SLURM_GPUS_ON_NODE": "1",
        "PYTHON": str(fake / "py"),
    }
    proc = run_launch(["--config", str(cfg)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert argv[argv.index("--config") + 1] == str(cfg) and argv[argv.index("--node-rank") + 1] == "0"
    assert not list(tmp_path.rglob("PWNED*"))


def test_env_file_lands_in_the_run_dir_private_and_without_credentials(config_file, tmp_path):
    fake = _fake_bin(tmp_path, "pdsh", "exit 0\n")
    _fake_bin(tmp_path, "ssh", "exit 0\n")  # DeepSpeed's runner first checks each host over ssh
    (tmp_path / "hosts").write_text("n0 slots=1\nn1 slots=1\n")
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "HF_TOKEN": "hf_secret",
        "NCCL_DEBUG": "INFO",
        "MY_SITE_VAR": "x1",
        "AWS_SECRET_ACCESS_KEY": "nope",
    }
    (tmp_path / "extra.env").write_text("WANDB_API_KEY=given-on-purpose\n")
    proc = run_launch(
        [
            "--config",
            str(config_file()),
            "--hostfile",
            str(tmp_path / "hosts"),
            "--export",
            "MY_SITE_VAR",
            "--env-file",
            str(tmp_path / "extra.env"),
        ],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    env_file = tmp_path / "run" / ".deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert "NCCL_DEBUG=INFO" in lines and "DS_ACCELERATOR=cpu" in lines and "MY_SITE_VAR=x1" in lines
    assert "WANDB_API_KEY=given-on-purpose" in lines
    assert not [ln for ln in lines if "hf_secret" in ln or "AWS_SECRET" in ln]
    assert not (ROOT / ".deepspeed_env.launch").exists()


def test_slurm_without_scontrol_says_what_is_missing(config_file, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("bash", "sed", "hostname", "grep", "dirname", "tail"):
        (bare / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bare), "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "gpu-[1-2]"}
    proc = run_launch(["--config", str(config_file()), "--dry-run"], tmp_path, env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "launch.sh: error: inside SLURM job 9 but 'scontrol' is not on PATH; it expands the node list "
        "'gpu-[1-2]' (load your site's slurm module, or pass --hostfile)"
    )


def test_without_an_activated_environment_launch_sh_finds_the_project_python_or_says_what_to_set(config_file, tmp_path):
    """It ended in a ModuleNotFoundError traceback when the venv was not activated."""
    cfg = config_file()
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    plain["PATH"] = "/usr/bin:/bin"  # no venv on PATH: as in a fresh shell
    env = dict(plain, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    found = subprocess.run(
        ["bash", str(LAUNCH), "--config", str(cfg), "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if Path(ROOT / ".venv" / "bin" / "python").exists():  # `make install` made it: launch.sh uses it
        assert found.returncode == 0, found.stderr[-2000:]
        assert str(ROOT / ".venv" / "bin" / "python") in found.stdout
    bare = tmp_path / "bare-python"
    bare.write_text('#!/bin/sh\nexec /usr/bin/env -i /bin/false "$@"\n')
    bare.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(LAUNCH), "--config", str(cfg), "--dry-run"],
        cwd=tmp_path,
        env=dict(env, PYTHON=str(bare)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"launch.sh: error: '{bare}' cannot import torch, deepspeed and dsdistill; run 'make install' (it makes "
        f"{ROOT}/.venv), activate the environment you installed into, or set PYTHON=/path/to/its/python"
    ]
