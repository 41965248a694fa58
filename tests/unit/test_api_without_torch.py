"""The API scales out on machines without torch: importing it must not import torch. Each side
starts with only what the project declares it needs."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_does_not_import_torch() -> None:
    code = (
        "import sys, api, api.app, api.server, api.queue, api.images, common.cli, common.up\n"
        "from api.app import create_app\n"
        "create_app()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_cli_help_for_the_api_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom common.cli import main\n"
        "try:\n    main(['api', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-queue-length" in proc.stdout


# The modules each side imports when it starts: the API under every gunicorn worker class it
# offers (and the tools that run without torch: the load generator, the Python client, top), and
# the worker's command line with its model stack.
API_STARTUP = (
    "import api.app, api.server, common.cli, common.up, common.bench, common.client, common.top\n"
    "from gunicorn.util import load_class\n"
    "from api.server import WORKER_CLASSES\n"
    "for uri in WORKER_CLASSES.values():\n"
    "    load_class(uri)\n"
    "api.app.create_app()\n"
)
WORKER_STARTUP = "import worker.main, worker.runner, worker.handler, worker.registry, common.cli\n"


def _declared(extras: tuple[str, ...]) -> set[str]:
    """The distributions that installing this project with ``extras`` brings: its dependencies (and
    those of the extras), and theirs, as the installed distributions declare them."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
    seen: set[tuple[str, frozenset[str]]] = set()  # each distribution with the extras asked of it
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for raw in metadata.distribution(req.name).requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return {name for name, _ in seen}


def _import_with_only(extras: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` where every installed third-party module outside what this project declares
    (``_declared``) fails to import, as it would in an environment that has only those."""
    from packaging.utils import canonicalize_name

    declared = _declared(extras)
    blocked = sorted(
        m
        for m, dists in metadata.packages_distributions().items()
        if m not in ("api", "common", "worker") and not any(canonicalize_name(d) in declared for d in dists)
    )
    # Found, so that code probing with importlib.util.find_spec (torch does) goes on, but not loaded.
    guard = (
        "import sys\n"
        "from importlib.machinery import ModuleSpec\n"
        f"BLOCKED = set({blocked!r})\n"
        "class Undeclared:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in BLOCKED:\n"
        "            return ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        why = f'No module named {spec.name!r} (not a declared dependency)'\n"
        "        raise ModuleNotFoundError(why, name=spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "sys.meta_path.insert(0, Undeclared())\n"
    )
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_api_starts_with_only_the_dependencies_it_declares() -> None:
    """``pip install redbatch`` (what docker/api.Dockerfile does) must give the API all it imports:
    gunicorn's gevent worker imports ``packaging`` without declaring it (gunicorn 26.1 and later), so
    the project declares it itself; test-only packages such as pytest's would otherwise hide that."""
    proc = _import_with_only((), API_STARTUP)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_worker_starts_with_only_the_dependencies_it_declares() -> None:
    pytest.importorskip("torchvision")
    proc = _import_with_only(("worker",), WORKER_STARTUP)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_guard_refuses_an_undeclared_module() -> None:
    """The check above can fail: pytest is installed here but declared only for the tests."""
    proc = _import_with_only((), "import pytest\n")
    assert proc.returncode != 0 and "not a declared dependency" in proc.stderr
