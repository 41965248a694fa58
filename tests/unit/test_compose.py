"""The deployment files: docker-compose.yml against the Compose Specification, and the Dockerfiles
against the CLI they start. No Docker daemon is needed: these read the files and run the CLI."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT.parent / "shared" / "compose-spec.json"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
DOCKERFILES = [API_DOCKERFILE, WORKER_DOCKERFILE]

Instruction = tuple[str, str]  # (KEYWORD, arguments), continuation lines joined


def parse_stages(path: Path) -> list[list[Instruction]]:
    """The instructions of each build stage (a stage starts at FROM), comments dropped."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        logical = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{path.name}: {keyword} before the first FROM"
        stages[-1].append((keyword, args.strip()))
    return stages


def final_stage(path: Path) -> list[Instruction]:
    return parse_stages(path)[-1]


def exec_form(path: Path, keyword: str) -> list[str]:
    """The JSON (exec) form of the final stage's last ``keyword`` instruction."""
    args = [a for k, a in final_stage(path) if k == keyword]
    assert args, f"{path.name} has no {keyword} in its final stage"
    value = json.loads(args[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{path.name}: {keyword} is not exec form"
    )
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"Compose Specification schema not found at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert "version" not in compose, "the top-level version key is obsolete in the Compose Specification"


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    assert {"redis", "api", "worker", "nginx", "prometheus", "grafana", "dcgm-exporter"} <= set(compose["services"])


@pytest.mark.parametrize("service", ["api", "worker"])
def test_service_waits_for_a_healthy_redis(compose: dict[str, Any], service: str) -> None:
    depends_on = compose["services"][service]["depends_on"]
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_redis_has_a_healthcheck_and_no_persistence(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "no"
    assert "--save" in command


def test_worker_reserves_one_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_worker_weights_cache_volume_is_where_torch_looks(compose: dict[str, Any]) -> None:
    env: dict[str, str] = {}
    for keyword, args in final_stage(WORKER_DOCKERFILE):
        if keyword == "ENV":
            env.update(pair.partition("=")[::2] for pair in shlex.split(args))
    torch_home = env.get("TORCH_HOME") or env["HOME"] + "/.cache/torch"
    targets = [v.split(":")[1] for v in compose["services"]["worker"]["volumes"] if isinstance(v, str)]
    assert torch_home in targets, f"weights would be downloaded again on every start: {torch_home} not in {targets}"
    named = {v.split(":")[0] for v in compose["services"]["worker"]["volumes"] if isinstance(v, str)}
    assert named <= set(compose.get("volumes") or {}), "a named volume is used but not declared"


def test_every_build_dockerfile_exists(compose: dict[str, Any]) -> None:
    builds = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert {"api", "worker"} <= set(builds)
    for name, build in builds.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).is_file(), f"service {name}: {context / dockerfile} does not exist"


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context.
    An approximation of Docker's rules that is enough for this repository: no ``!`` exceptions."""
    ignore = ROOT / ".dockerignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    patterns = [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.startswith(("#", "!"))]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch(prefix, pattern) or fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_what_the_image_needs(dockerfile: Path) -> None:
    # The worker image installs the whole context (a bind mount); the api image COPYs parts of it.
    needed = {"pyproject.toml", "README.md", "api", "common", "worker"}
    for stage in parse_stages(dockerfile):
        for keyword, args in stage:
            if keyword == "COPY" and not args.startswith("--from"):
                needed.update(args.split()[:-1])
    for source in sorted(needed):
        assert (ROOT / source).exists(), f"{dockerfile.name}: {source} is not in the repository"
        assert not dockerignored(source), f"{dockerfile.name}: {source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_names_a_real_subcommand_and_flags(dockerfile: Path) -> None:
    argv = exec_form(dockerfile, "CMD")
    assert argv[0] == "redbatch", f"{dockerfile.name}: CMD should start the redbatch console script"
    subcommand = argv[1]
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", subcommand, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"redbatch {subcommand} --help failed:\n{done.stderr}"
    for flag in (a for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", done.stdout), (
            f"{dockerfile.name}: {flag} is not a flag of {subcommand}"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    users = [a for k, a in final_stage(dockerfile) if k == "USER"]
    assert users, f"{dockerfile.name}: the final stage runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: USER {users[-1]}"


def test_api_image_does_not_install_torch() -> None:
    stages = parse_stages(API_DOCKERFILE)
    base = stages[-1][0][1].split()[0]
    assert "pytorch" not in base.lower(), f"the api image is based on {base}"
    for stage in stages:
        for keyword, args in stage:
            if keyword == "RUN":
                assert "torch" not in args.lower() and "[worker]" not in args, f"api image: RUN {args}"
    install = [a for k, a in stages[-1] if k == "RUN" and "pip install" in a]
    assert install and all("--no-index" in a for a in install), "the api image should install only the built wheels"


def test_api_healthcheck_probes_the_served_port() -> None:
    stage = final_stage(API_DOCKERFILE)
    healthcheck = next(a for k, a in stage if k == "HEALTHCHECK")
    bind = exec_form(API_DOCKERFILE, "CMD")
    port = bind[bind.index("--bind") + 1].rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    exposed = {a.split("/")[0] for k, args in stage if k == "EXPOSE" for a in args.split()}
    assert port in exposed
