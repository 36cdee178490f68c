"""deploy/'s scripts, images and copy-paste commands: shellcheck, hadolint, what srun gives
each rank, and the placeholders the README's `sed` lines replace."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployfiles import DEPLOY, DOCKERFILES, KUBE_FILES, README, REPO, SBATCH, SHELL_FILES

# Stand-ins a user would set, in the form the README's `export` lines give them.
USER_VALUES = {"BUCKET": "s3://acme-data", "REGISTRY": "registry.acme.io/team"}
PLACEHOLDERS = ("s3://your-bucket", "formatlab/prep:latest", "formatlab/node-agent:latest")


def _tool(name: str) -> str:
    """The linter from the dev extra (beside this Python), else from PATH (Debian's), else skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]', or apt-get install {name})")
    return found


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", "--format=gcc", str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "info",
                           str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# Slurm: the CPUs each task really has
# --------------------------------------------------------------------------------------


def _run_sbatch(tmp_path: Path, gpus: int, cpus: int) -> list[list[str]]:
    """Runs the sbatch script with `srun` and `scontrol` that only record their arguments
    (there is no Slurm here); returns each srun command line."""
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-1\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "STORE": "s3://acme-data/formatlab", "RESULTS": "s3://acme-data/results",
           "FORMATLAB_VENV": str(venv.parent), "SLURM_JOB_NODELIST": "node-[1-2]",
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": str(gpus),
           "SLURM_CPUS_PER_TASK": str(cpus)}
    subprocess.run(["bash", str(SBATCH)], env=env, check=True, capture_output=True)
    return [shlex.split(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("gpus,cpus", [(1, 16), (8, 64), (8, 16)])
def test_srun_gets_the_cpus_per_task_and_workers_fit_them(tmp_path: Path, gpus: int,
                                                         cpus: int) -> None:
    """srun in Slurm 22.05-23.02 does not take --cpus-per-task over from sbatch; the script
    must pass it, and size the DataLoader workers by the CPUs each rank has."""
    (srun,) = _run_sbatch(tmp_path, gpus, cpus)
    assert f"--cpus-per-task={cpus}" in srun, srun
    workers = int(srun[srun.index("--workers") + 1])
    per_rank = cpus // gpus
    assert 1 <= workers <= max(per_rank - 1, 1), (workers, per_rank)


# --------------------------------------------------------------------------------------
# Placeholders: one scheme, and the README's sed lines leave nothing of it behind
# --------------------------------------------------------------------------------------


def _sed_lines(text: str, comment: bool) -> list[str]:
    """Logical `sed ...` lines (continuations joined); in comments when ``comment``."""
    lines = [re.sub(r"^#\s?", "", l) for l in text.splitlines() if l.startswith("#")] \
        if comment else text.splitlines()
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [l.strip() for l in joined.splitlines() if re.match(r"\s*sed\s", l)]


def _apply(line: str, values: dict[str, str]) -> tuple[Path, str]:
    """The file a `sed -e ... FILE | kubectl apply -f -` line reads, as that sed leaves it."""
    words = shlex.split(line.split("|")[0])
    (target,) = [w for w in words if w.startswith("deploy/")]
    text = (REPO / target).read_text()
    for expr in (words[i + 1] for i, w in enumerate(words) if w == "-e"):
        m = re.fullmatch(r"s#([^#]*)#([^#]*)#g", expr)
        assert m, f"not a s#A#B#g expression: {expr}"
        old, new = m.group(1), re.sub(r"\$(\w+)", lambda v: values[v.group(1)], m.group(2))
        assert old in text, f"{line}: {old!r} does not occur in {target}"
        text = text.replace(old, new)
    return REPO / target, text


def _all_sed_lines() -> list[str]:
    found = _sed_lines(README.read_text(), comment=False)
    for path in KUBE_FILES:
        found += _sed_lines(path.read_text(), comment=True)
    return found


def test_readme_exports_the_values_in_the_form_the_sed_lines_expect() -> None:
    text = README.read_text()
    for name, value in USER_VALUES.items():
        exported = re.findall(rf"export {name}=(\S+)", text)
        assert exported, f"README never exports {name}"
        for example in exported:
            assert example.startswith("s3://") == value.startswith("s3://"), (name, example)


@pytest.mark.parametrize("line", _all_sed_lines())
def test_sed_lines_replace_every_placeholder_once(line: str) -> None:
    path, text = _apply(line, USER_VALUES)
    assert "s3://s3://" not in text, f"{line} doubles the scheme"
    body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    for placeholder in PLACEHOLDERS:
        assert placeholder not in body, f"{line} leaves {placeholder} in {path.name}"
    assert USER_VALUES["BUCKET"] in body
    assert list(yaml.safe_load_all(text))


def test_every_kubernetes_file_has_its_sed_line_in_the_readme_and_its_header() -> None:
    readme = {_apply(l, USER_VALUES)[0] for l in _sed_lines(README.read_text(), comment=False)}
    for path in KUBE_FILES:
        assert path in readme, f"README has no sed line for {path.relative_to(DEPLOY)}"
        assert _sed_lines(path.read_text(), comment=True), f"{path.name}: no sed line in header"


def test_placeholders_are_the_only_bucket_and_image_names() -> None:
    for path in [*KUBE_FILES, SBATCH, README]:
        text = path.read_text()
        buckets = set(re.findall(r"s3://(\w[\w.-]*)", text)) - {"your-bucket", "placeholder"}
        assert not buckets - {"acme-data"}, f"{path.name}: other bucket names {buckets}"
        images = set(re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M))
        assert images <= {"formatlab/prep:latest", "formatlab/node-agent:latest"}, images
