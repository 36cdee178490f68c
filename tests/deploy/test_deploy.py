"""Keep deploy/ honest: its files parse, and its command lines are what the real CLIs accept.

Every ``node-agent ...``, ``python prep/convert.py ...`` and ``torchrun ...`` command line in
deploy/ (Kubernetes command/args lists, strings inside YAML such as a RayJob entrypoint, shell
scripts, and the shell code blocks of deploy/README.md) is extracted, its variables are
substituted, and it is parsed, not run, by the project's own argument parsers.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployfiles import (CLUSTER, DEPLOY, DOCKERFILES, NODE_JOB, RAYJOB, README, REPO, SBATCH,
                         SHELL_FILES, containers, docs, env_of, secret_ref)

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))

# --------------------------------------------------------------------------------------
# Extracting command lines
# --------------------------------------------------------------------------------------

# Values that stand in for variables whose value the file leaves to the user or the
# runtime ($STORE, $(RANK), ${SLURM_NNODES}, ...), chosen by the option they follow.
# Options whose values are names from a registry (--format, --loader, --source, ...) have no
# stand-in: they must be literal or resolve to a literal default, so that they are checked.
PLACEHOLDERS = {
    "--rank": "0", "--world-size": "2", "--epochs": "1", "--batch-size": "8",
    "--workers": "2", "--seed": "0", "--max-steps": "1", "--size": "64",
    "--shard-samples": "16", "--max-rejects": "0", "--limit": "10", "--repeat": "1",
    "--lr": "0.1", "--val-fraction": "0.1", "--storage-options": "{}",
    "--store": "s3://placeholder/store", "--src": "s3://placeholder/raw",
    "--dst": "s3://placeholder/store", "--results": "s3://placeholder/results",
    "--cache": "/tmp/placeholder-cache", "--out": "/tmp/placeholder-report",
    "--name": "placeholder", "--dataset": "placeholder", "--address": "auto",
    # torchrun
    "--nnodes": "2", "--nproc-per-node": "2", "--nproc_per_node": "2",
    "--rdzv-endpoint": "placeholder-host:29500", "--rdzv_endpoint": "placeholder-host:29500",
    "--rdzv-id": "1", "--rdzv_id": "1", "--node-rank": "0", "--node_rank": "0",
    "--master-addr": "placeholder-host", "--master_addr": "placeholder-host",
    "--master-port": "29500", "--master_port": "29500",
}

_REF = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$\((\w+)\)|\$(\w+)")
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
_CONTROL = set(";&|()<>")
_SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


class Unresolved(Exception):
    """A variable the file gives no value or default for."""


def expand(text: str, env: dict[str, str], seen: frozenset[str] = frozenset()) -> str:
    """Shell/Kubernetes variable expansion against ``env`` (``${X:-default}`` honoured)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3) or m.group(4)
        default = m.group(2)
        if name in env and name not in seen:
            return expand(env[name], env, seen | {name})
        if default is not None:
            return expand(default, env, seen | {name})
        raise Unresolved(name)

    out = _REF.sub(sub, text)
    if "$" in out:  # arithmetic, command substitution: not a value we can know
        raise Unresolved(out)
    return out


@dataclass
class CommandLine:
    """One command line found in deploy/: where, which program, its raw arguments."""

    where: str
    program: str  # "node-agent", "convert" or "torchrun"
    raw: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def args(self) -> list[str]:
        """The arguments with every variable replaced by its value or a stand-in."""
        out: list[str] = []
        for i, token in enumerate(self.raw):
            try:
                out.append(expand(token, self.env))
            except Unresolved:
                flag = self.raw[i - 1] if i else ""
                out.append(PLACEHOLDERS.get(flag, token))
        return out

    def __str__(self) -> str:
        return f"{self.where}: {self.program} {' '.join(self.raw)}"


def _program(token: str) -> str | None:
    if token == "node-agent" or token.endswith("/node-agent"):
        return "node-agent"
    if token.endswith("prep/convert.py"):
        return "convert"
    if token == "torchrun":
        return "torchrun"
    return None


def scan_tokens(tokens: list[str], where: str, env: dict[str, str]) -> Iterator[CommandLine]:
    """Every command in a token list, each up to the next shell control operator."""
    for i, token in enumerate(tokens):
        program = _program(token)
        if program is None:
            continue
        raw: list[str] = []
        for t in tokens[i + 1:]:
            if t and set(t) <= _CONTROL:
                break
            raw.append(t)
        if program == "node-agent" and (not raw or raw[0].startswith("-")):
            continue  # `node-agent --help` and the like: no subcommand to check
        yield CommandLine(where, program, raw, env)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Shell lines with comments dropped and backslash continuations joined."""
    buf: list[str] = []
    start = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        yield start, " ".join(buf)
        buf = []
    if buf:
        yield start, " ".join(buf)


def shell_assignments(text: str) -> dict[str, str]:
    """``NAME=value`` and ``export NAME=value`` lines, values unquoted."""
    env: dict[str, str] = {}
    for _, line in logical_lines(text):
        m = _ASSIGN.match(line)
        if not m:
            continue
        try:
            words = shlex.split(m.group(2), comments=True)
        except ValueError:
            continue
        if words:
            env[m.group(1)] = words[0]
    return env


def scan_shell(text: str, where: str, env: dict[str, str],
               first_line: int | None = None) -> Iterator[CommandLine]:
    """Commands in shell text; ``first_line`` numbers them within their file."""
    for n, line in logical_lines(text):
        if "node-agent" not in line and "prep/convert.py" not in line and "torchrun" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        at = where if first_line is None else f"{where}:{first_line + n - 1}"
        yield from scan_tokens(list(lexer), at, env)


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's env as Kubernetes expands $(VAR): literal values; others stand in."""
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            env[entry["name"]] = "$" + "{" + entry["name"] + "}"  # resolved by PLACEHOLDERS
    return env


def _walk_yaml(node: Any, where: str, env: dict[str, str]) -> Iterator[CommandLine]:
    if isinstance(node, dict):
        lists = {k: node[k] for k in ("command", "args") if isinstance(node.get(k), list)}
        if lists:
            env = {**env, **_container_env(node)}
            tokens = [str(t) for t in (lists.get("command") or []) + (lists.get("args") or [])]
            yield from scan_tokens(tokens, where, env)
            for t in tokens:  # `bash -c "node-agent run ..."` inside the list
                if any(c.isspace() for c in t):
                    yield from scan_shell(t, where, env)
        for key, value in node.items():
            if key not in lists:
                yield from _walk_yaml(value, where, env)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_yaml(item, where, env)
    elif isinstance(node, str):
        yield from scan_shell(node, where, env)


def markdown_shell_blocks(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, code) of every fenced shell code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if lang in _SHELL_LANGS:
            yield i + 2, "\n".join(body)
        i = j + 1


def extract_command_lines(path: Path) -> list[CommandLine]:
    """Every node-agent / prep/convert.py / torchrun command line in one deploy/ file."""
    rel = str(path.relative_to(REPO))
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        found: list[CommandLine] = []
        for doc in yaml.safe_load_all(text):
            found.extend(_walk_yaml(doc, rel, {}))
        return found
    if path.suffix == ".md":
        blocks = list(markdown_shell_blocks(text))
        env = shell_assignments("\n".join(code for _, code in blocks))
        return [c for start, code in blocks for c in scan_shell(code, rel, env, start)]
    return list(scan_shell(text, rel, shell_assignments(text), 1))


def all_command_lines() -> list[CommandLine]:
    files = [*YAML_FILES, *SHELL_FILES, *sorted(DEPLOY.rglob("*.md"))]
    return [c for f in files for c in extract_command_lines(f)]


COMMANDS = all_command_lines()


def _commands(program: str) -> list[Any]:
    return [pytest.param(c, id=c.where) for c in COMMANDS if c.program == program]


# --------------------------------------------------------------------------------------
# Files parse
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_the_deploy_files_exist() -> None:
    for path in (README, SBATCH, RAYJOB, NODE_JOB, CLUSTER,
                 DEPLOY / "docker" / "Dockerfile.prep", DEPLOY / "docker" / "Dockerfile.gpu"):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shell_scripts_pass_bash_n(path: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_script_asks_for_one_agent_per_gpu_node() -> None:
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    assert any(d.startswith("--nodes=") for d in directives)
    assert "--ntasks-per-node=1" in directives
    assert "--gres=gpu:1" in directives
    assert "scontrol show hostnames" in text and "MASTER_PORT" in text


# --------------------------------------------------------------------------------------
# Command lines: found, and accepted by the real parsers
# --------------------------------------------------------------------------------------


def test_command_lines_are_found_where_expected() -> None:
    def count(path: Path, program: str) -> int:
        rel = str(path.relative_to(REPO))
        return sum(c.program == program and c.where.startswith(rel) for c in COMMANDS)

    assert count(RAYJOB, "convert") == 1
    assert count(NODE_JOB, "node-agent") == 1
    assert count(SBATCH, "node-agent") == 2
    assert count(SBATCH, "torchrun") == 1
    assert count(README, "node-agent") >= 3
    assert count(README, "convert") >= 4


def test_extraction_substitutes_variables() -> None:
    (job,) = [c for c in COMMANDS if c.where == "deploy/k8s/node-agent-job.yaml"]
    args = job.args()
    assert args[args.index("--rank") + 1] == "0"  # $(RANK) from the downward API
    assert args[args.index("--world-size") + 1] == "2"  # $(WORLD_SIZE) = "2" in env
    srun_cmd = next(c for c in COMMANDS if c.where.startswith("deploy/slurm") and c.program == "node-agent")
    args = srun_cmd.args()
    assert args[args.index("--format") + 1] == "npy-files"  # ${FORMAT:-npy-files}
    assert args[args.index("--store") + 1] == PLACEHOLDERS["--store"]  # required from the user


def _node_agent_group() -> Any:
    from node.cli import cli

    return cli


@pytest.mark.parametrize("command", _commands("node-agent"))
def test_node_agent_command_lines_parse(command: CommandLine) -> None:
    import click

    group = _node_agent_group()
    args = command.args()
    root = click.Context(group, info_name="node-agent")
    sub = group.get_command(root, args[0])
    assert sub is not None, f"{command}: no subcommand {args[0]!r}"
    try:
        ctx = sub.make_context(args[0], args[1:], parent=root)
    except click.ClickException as exc:
        pytest.fail(f"{command}\n  rejected: {exc.format_message()}")

    # Names must be registered, and the loader must read the format.
    from node.loaders import get_loader
    from shared.formats import get_format

    loader, fmt = ctx.params.get("loader"), ctx.params.get("format_id", ctx.params.get("format"))
    if fmt is not None:
        fmt_obj = get_format(fmt)
        if loader is not None:
            assert get_loader(loader).supports(fmt_obj), f"{command}: {loader} cannot read {fmt}"


@pytest.mark.parametrize("command", _commands("convert"))
def test_convert_command_lines_parse(command: CommandLine) -> None:
    from prep.config import UsageError, parse_config

    try:
        config = parse_config(command.args())
    except UsageError as exc:
        pytest.fail(f"{command}\n  rejected: {exc}")
    assert config.conversion.formats


@pytest.mark.parametrize("command", _commands("torchrun"))
def test_torchrun_command_lines_parse(command: CommandLine) -> None:
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = get_args_parser().parse_args(command.args())
    except SystemExit:
        pytest.fail(f"{command}\n  rejected: {err.getvalue().strip()}")
    # node-agent is a console script, not a Python file: torchrun must not prepend python.
    assert ns.no_python and ns.training_script == "node-agent", str(command)


# --------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------


def test_node_agent_job_is_an_indexed_ddp_job() -> None:
    found = docs(NODE_JOB)
    job, svc = found["Job"], found["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    args = [str(a) for a in container.get("command", []) + container.get("args", [])]

    assert spec["completionMode"] == "Indexed"
    world = int(env["WORLD_SIZE"]["value"])
    assert spec["parallelism"] == spec["completions"] == world
    assert args[args.index("--world-size") + 1] in ("$(WORLD_SIZE)", str(world))
    assert args[args.index("--rank") + 1] == "$(RANK)"
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # Kubernetes expands $(VAR) in command/args only for variables defined in the container.
    for token in args:
        for name in re.findall(r"\$\((\w+)\)", token):
            assert name in env, f"$({name}) is used in args but not defined in env"

    # Rendezvous: rank 0's stable name through the headless Service.
    assert svc["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == svc["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert "MASTER_PORT" in env

    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args[args.index("--cache") + 1] == "/cache"
    assert "hostPath" in volumes[mounts["/cache"]["name"]] or \
        "persistentVolumeClaim" in volumes[mounts["/cache"]["name"]]
    assert mounts["/run/udev"]["readOnly"] is True
    assert volumes[mounts["/run/udev"]["name"]]["hostPath"]["path"] == "/run/udev"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert secret_ref(env.get(name)), f"{name} must come from a Secret"


def test_rayjob_runs_convert_with_secrets_and_token_auth() -> None:
    job = docs(RAYJOB)["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "prep/convert.py" in spec["entrypoint"]
    assert not _CONTROL & set(spec["entrypoint"]), "KubeRay pastes the entrypoint into bash"
    cluster = spec["rayClusterSpec"]
    ray_containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
    assert cluster["workerGroupSpecs"]
    ray_containers += [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for container in ray_containers:
        env = env_of(container)
        assert container["image"] == "formatlab/prep:latest"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert secret_ref(env.get(name)), f"{container['name']}: {name} must come from a Secret"
        endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]
        assert endpoint["optional"] is True
    # Token authentication: test_kubernetes.py::test_rayjob_turns_token_auth_on_through_auth_options


def test_no_credentials_are_written_in_deploy() -> None:
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)", re.I)
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            for container in containers(doc):
                for entry in container.get("env") or []:
                    if secretish.search(entry["name"]):
                        assert "value" not in entry, f"{path}: {entry['name']} written inline"
    for path in DEPLOY.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{path}: an AWS access key id"
        # A written-out secret key (40 characters), not a reference such as "$AWS_SECRET_ACCESS_KEY".
        assert not re.search(r"aws_secret_access_key\W{1,3}[A-Za-z0-9/+]{30,}", text, re.I), path
        assert "RAY_AUTH_MODE=disabled" not in text, f"{path}: token authentication turned off"


# --------------------------------------------------------------------------------------
# Ray cluster launcher config
# --------------------------------------------------------------------------------------


def test_ray_cluster_config_is_what_ray_up_accepts() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER.read_text())
    cwd = os.getcwd()
    os.chdir(REPO)  # file_mounts' local "." is the checkout, as `ray up` runs from the root
    try:
        config = prepare_config(raw)
        validate_config(config)
    finally:
        os.chdir(cwd)
    assert config["provider"]["type"] == "aws"
    head = config["head_node_type"]
    workers = [k for k in config["available_node_types"] if k != head]
    assert workers
    for name in [head, *workers]:
        node_config = config["available_node_types"][name]["node_config"]
        assert "IamInstanceProfile" in node_config, f"{name}: S3 access comes from an IAM role"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert any("pip-install.sh" in c or "pip install" in c for c in config["setup_commands"])
    for remote, local in config["file_mounts"].items():
        assert ".aws" not in remote + local, "AWS credentials must not be copied to nodes"


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_its_ignore_file_admits_it(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    sources = [s for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
               for s in line.split()[:-1] if not s.startswith("--")]
    assert sources
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    allowed = {line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")}
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
        assert source.rstrip("/") in allowed, f"{ignore.name} keeps {source} out of the context"


def _build_context(dockerfile: Path, dest: Path) -> None:
    """Copy what the Dockerfile's .dockerignore lets into the build context (its ! lines)."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    for entry in (line[1:].rstrip("/") for line in ignore if line.startswith("!")):
        source, target = REPO / entry, dest / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_build_context_is_enough_for_pip_install(dockerfile: Path, tmp_path: Path) -> None:
    """`pip install .` inside the image sees only the build context: it must build a wheel
    with every package from it."""
    context = tmp_path / "context"
    _build_context(dockerfile, context)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(context)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("formatlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("prep/convert.py", "node/cli.py", "shared/storage.py"):
        assert module in names, f"{module} missing from the wheel built in the image"


def test_gpu_image_extras_exist_in_pyproject() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    text = (DEPLOY / "docker" / "Dockerfile.gpu").read_text() + (DEPLOY / "pip-install.sh").read_text()
    named = set(re.findall(r"\bgpu-cu\d+\b", text))
    assert named >= {"gpu-cu12", "gpu-cu13"}
    for extra in named:
        assert extra in extras, f"{extra} is not an extra of pyproject.toml"


@pytest.mark.parametrize("variant,extra", [("cpu", ""), ("gpu-cu12", "[gpu-cu12]"),
                                           ("gpu-cu13", "[gpu-cu13]")])
def test_pip_install_script_pins_torch_from_pyproject(tmp_path: Path, variant: str, extra: str) -> None:
    """Runs deploy/pip-install.sh with a python whose `-m pip` only records its arguments."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ "$1 $2" == "-m pip" ]]; then echo "${{@:3}}" >> {log}; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    subprocess.run(["bash", str(DEPLOY / "pip-install.sh"), variant, str(REPO)],
                   env={**os.environ, "PYTHON": str(fake)}, check=True, capture_output=True)
    torch_line, project_line = log.read_text().splitlines()
    pins = [d for d in _pyproject()["project"]["dependencies"]
            if re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0] in ("torch", "torchvision")]
    assert torch_line.split()[-2:] == pins and "--index-url" in torch_line
    assert project_line == f"install {REPO}{extra}"


# --------------------------------------------------------------------------------------
# Token authentication, as deploy/README.md tells clients to use it
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_token_auth_as_the_readme_describes(tmp_path: Path, start_ray: Any) -> None:
    """A head started with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, as cluster.yaml starts
    it, refuses clients without the token or with another one, and accepts the client settings
    deploy/README.md gives: RAY_AUTH_TOKEN (Kubernetes) and RAY_AUTH_TOKEN_PATH (`ray up`)."""
    token_file = tmp_path / "ray-auth" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text("f" * 64)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of the user's is picked up
    head_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    with_path = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    head = start_ray(head_env, num_cpus=1, probe_env=with_path)
    try:
        refused = head.job("list", env=base, timeout=180)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "authentication" in said.lower(), said[-2000:]
        wrong = head.job("list", env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                         timeout=180)
        assert wrong.returncode != 0, wrong.stdout[-2000:]
        with_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_file.read_text()}
        listed = head.job("list", env=with_env, timeout=180)
        assert listed.returncode == 0, (listed.stdout + listed.stderr)[-2000:]

        submitted = head.job("submit", "--", "python", "-c", "print('ran')", env=with_path,
                             timeout=180)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "ran" in submitted.stdout
    finally:
        head.stop()
