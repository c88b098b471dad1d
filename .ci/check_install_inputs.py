#!/usr/bin/env python3
"""Refuse install inputs that name a local file or directory (stdlib only; runs before anything installs).

A requirement such as `pkg @ file:///tmp/pkg.whl`, `-e ./vendor/x`, `--find-links /opt/wheels` or a bare
`/tmp/x.whl` works only on the machine that wrote it: a fresh machine (CI, a new user) stops at the install.
The inputs checked: constraints/requirements files, pyproject.toml's dependency lists, the Makefile's
`pip install` lines and `.ci/run`. The project itself (`-e .`, `.[dev]`) is the one local target allowed.

Usage: python3 .ci/check_install_inputs.py [ROOT]   exit 0 when clean, 1 with one line per finding.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PROJECT_ITSELF = re.compile(r"^\.(\[[\w,\-]+\])?/?$")
"""`.` or `.[extra]`: the project being installed, the only local target allowed."""
LOCAL_URL = re.compile(r"(?i)\bfile:")
PATH_OPTIONS = (
    "-e",
    "--editable",
    "-f",
    "--find-links",
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "--index-url",
    "-i",
    "--extra-index-url",
    "--target",
    "-t",
    "--prefix",
    "--root",
)


def _is_local_path(token: str) -> bool:
    token = token.strip().strip("'\"")
    if not token or PROJECT_ITSELF.match(token):
        return False
    if LOCAL_URL.search(token):
        return True
    if token.startswith(("/", "~", "./", "../")) or re.match(r"^[A-Za-z]:\\", token):
        return True
    return token.endswith((".whl", ".tar.gz", ".zip")) and "://" not in token


def check_requirement_line(line: str) -> str | None:
    """Why a requirements/constraints line names a local path, or None when it does not."""
    text = line.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return None
    if LOCAL_URL.search(text):
        return "a file: URL"
    if "@" in text:
        target = text.split("@", 1)[1].strip().split(";")[0].strip()
        if _is_local_path(target):
            return f"a direct reference to '{target}'"
    parts = text.split()
    for i, tok in enumerate(parts):
        if tok in PATH_OPTIONS and i + 1 < len(parts) and _is_local_path(parts[i + 1]):
            if tok in ("-r", "--requirement", "-c", "--constraint") and not parts[i + 1].startswith(("/", "~")):
                continue  # a repository-relative requirements file travels with the checkout
            return f"'{tok} {parts[i + 1]}'"
        if tok.startswith(tuple(o + "=" for o in PATH_OPTIONS)) and _is_local_path(tok.split("=", 1)[1]):
            return f"'{tok}'"
    if _is_local_path(parts[0]):
        return f"a path '{parts[0]}'"
    return None


def _pip_lines(text: str) -> list[str]:
    """Lines of a shell script or Makefile that run pip (with continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    return [ln for ln in joined.splitlines() if re.search(r"\bpip3?\b.*\binstall\b|\buv\b.*\bpip\b", ln)]


def _shell_tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


def check_command_line(line: str) -> str | None:
    """Why a `pip install ...` command line names a local path, or None."""
    tokens = _shell_tokens(line)
    try:
        start = tokens.index("install") + 1
    except ValueError:
        return None
    args = tokens[start:]
    for i, tok in enumerate(args):
        if "$" in tok:  # a make/shell variable: its value is checked where it is defined
            continue
        prev = args[i - 1] if i else ""
        if prev in ("-r", "--requirement", "-c", "--constraint") and not tok.startswith(("/", "~")):
            continue
        if tok.startswith("-") and "=" not in tok:
            continue
        value = tok.split("=", 1)[1] if tok.startswith("-") else tok
        if _is_local_path(value):
            return f"'{tok}'"
    return None


def check_variables(text: str) -> list[tuple[int, str]]:
    """Make/shell variable definitions whose value names a local package path."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)\s*[:?+]?=\s*(.*)$", line)
        if not m or not m.group(1).endswith(
            ("SPEC", "REQ", "REQUIREMENTS", "WHEEL", "PKG", "PACKAGES", "FIND_LINKS", "INDEX_URL")
        ):
            continue
        for tok in _shell_tokens(m.group(2)):
            if _is_local_path(tok):
                out.append((n, f"{m.group(1)} names '{tok}'"))
    return out


def check_pyproject(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if tomllib is None:
        deps = re.findall(r'"([^"]+)"', text)
    else:
        data = tomllib.loads(text)
        project = data.get("project", {})
        deps = list(project.get("dependencies", []))
        for group in project.get("optional-dependencies", {}).values():
            deps.extend(group)
        deps.extend(data.get("build-system", {}).get("requires", []))
        for group in data.get("dependency-groups", {}).values():
            deps.extend(d for d in group if isinstance(d, str))
    return [f"{path.name}: dependency '{d}' names {why}" for d in deps if (why := check_requirement_line(d))]


def check_tree(root: Path) -> list[str]:
    """Every finding under `root`, one line each: 'FILE:LINE: what'."""
    findings: list[str] = []
    req_files = sorted({*root.glob("constraints*.txt"), *root.glob("requirements*.txt")})
    for f in req_files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if why := check_requirement_line(line):
                findings.append(f"{f.name}:{n}: names {why}; a fresh machine has no such file")
    if (root / "pyproject.toml").is_file():
        findings += [f + "; a fresh machine has no such file" for f in check_pyproject(root / "pyproject.toml")]
    for name in ("Makefile", ".ci/run"):
        f = root / name
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        for n, why in check_variables(text):
            findings.append(f"{name}:{n}: {why}; a fresh machine has no such file")
        for line in _pip_lines(text):
            if why := check_command_line(line):
                findings.append(f"{name}: pip install with {why}; a fresh machine has no such file")
    return findings


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    findings = check_tree(root)
    for f in findings:
        print(f"install inputs: {f}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
