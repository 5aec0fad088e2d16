"""The deployment files, checked without a container engine (none runs here or in CI).

The compose file is validated against the compose-spec JSON schema (as written, and
again with .env.example's values substituted the way compose substitutes them), then
read as YAML for the properties the cluster relies on. The Dockerfile is checked for
what the services need from it. What this cannot show, an image building or the
containers starting, is said in the README's "Run on a cluster".
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ORCHARD_SERVICES = ("migrate", "flower", "cpu-worker", "gpu-worker", "cnn-cpu-worker", "scheduler")

# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def variables_used(text: str) -> dict[str, set[str]]:
    """name -> the operators it is used with ("" for plain ${VAR})."""
    used: dict[str, set[str]] = {}
    for match in _VARIABLE.finditer(text):
        name = match["name"] or match["bare"]
        if name:
            used.setdefault(name, set()).add(match["op"] or "")
    return used


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution rules, for the forms the file uses."""

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"], match["arg"]
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op and op.endswith("?"):
            raise AssertionError(f"required variable {name} is unset: {arg}")
        return arg if op and op.endswith("-") else ""

    return _VARIABLE.sub(substitute, text)


def load(text: str) -> dict[str, Any]:
    return YAML(typ="safe").load(text)


def render(env: dict[str, str]) -> dict[str, Any]:
    """Parse, then substitute in every string, as compose does (values stay strings)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with .env.example as .env."""
    return render(env_example())


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_matches_the_compose_spec() -> None:
    done = check_schema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_with_the_example_env_matches_the_compose_spec(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "rendered.json"
    path.write_text(json.dumps(rendered))
    done = check_schema(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text()
    broken.write_text(text.replace("  flower:\n", "  flower:\n    ports_typo: []\n", 1))
    done = check_schema(broken)
    assert done.returncode != 0 and "ports_typo" in done.stdout + done.stderr


def test_every_variable_is_documented_in_the_env_example() -> None:
    documented = env_example()
    used = variables_used(COMPOSE.read_text())
    assert sorted(set(used) - set(documented)) == []
    # and the example documents nothing the compose file does not use
    assert sorted(set(documented) - set(used)) == []
    # each documented variable has a comment above it
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith("#") and "=" in line:
            above = lines[index - 1]
            assert above.startswith("#") or "=" in above, f"{line}: undocumented"


def test_required_settings_fail_loudly_when_missing() -> None:
    used = variables_used(COMPOSE.read_text())
    for secret in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "ORCHARD_DATA_DIR"):
        assert ":?" in used[secret], f"{secret} should be required (${{{secret}:?...}})"
    env = env_example()
    del env["REDIS_PASSWORD"]
    with pytest.raises(AssertionError, match="REDIS_PASSWORD"):
        interpolate(COMPOSE.read_text(), env)


def test_no_literal_secrets() -> None:
    compose = load(COMPOSE.read_text())
    text = COMPOSE.read_text()
    # every URL with credentials takes its password from a variable
    for url in re.findall(r"\w+(?:\+\w+)?://[^\s\"']+", text):
        if "@" in url:
            userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
            password = userinfo.partition(":")[2]
            assert password.startswith("${"), url
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH|TOKEN", key):
                assert re.fullmatch(r"(\$\{[^}]+\}:?)+", str(value)), f"{name}.{key}: {value}"
    redis = compose["services"]["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    # the example's passwords are placeholders, not someone's real ones
    for key, value in env_example().items():
        if "PASSWORD" in key:
            assert value.startswith("change-me"), key


def test_services_and_their_roles(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert {"redis", "postgres", "flower", "cpu-worker", "gpu-worker"} <= set(services)
    redis = services["redis"]["command"]
    assert redis[0] == "redis-server"
    assert redis[redis.index("--requirepass") + 1] == env_example()["REDIS_PASSWORD"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == env_example()["REDIS_PASSWORD"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    # room for two connections per worker process (unit + lease heartbeat)
    max_connections = env_example()["POSTGRES_MAX_CONNECTIONS"]
    assert services["postgres"]["command"] == [
        "postgres",
        "-c",
        f"max_connections={max_connections}",
    ]
    assert int(max_connections) > 100  # PostgreSQL's own default
    cpu = services["cpu-worker"]["command"]
    assert cpu[:4] == ["orchard", "worker", "--queues", "cpu,preprocess,report"]
    assert services["gpu-worker"]["command"] == ["orchard", "worker", "--gpus", "all"]


def test_flower_has_basic_auth_and_listens_on_localhost(rendered: dict[str, Any]) -> None:
    flower = rendered["services"]["flower"]
    assert flower["command"][:4] == ["celery", "-A", "workers.app", "flower"]
    env = env_example()
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == (
        f"{env['FLOWER_USER']}:{env['FLOWER_PASSWORD']}"
    )
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    # with nothing set, the default is still localhost only
    defaults = render({k: v for k, v in env.items() if k not in ("FLOWER_BIND", "FLOWER_PORT")})
    assert defaults["services"]["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    # it watches the same broker as the workers
    worker_env = rendered["services"]["cpu-worker"]["environment"]
    assert flower["environment"]["ORCHARD_BROKER_URL"] == worker_env["ORCHARD_BROKER_URL"]


def test_gpu_worker_reserves_nvidia_gpus_and_cannot_be_scaled(rendered: dict[str, Any]) -> None:
    gpu = rendered["services"]["gpu-worker"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "all"
    # one container per host (it runs a worker per GPU); --scale would share the cards
    assert gpu["container_name"] == "orchard-gpu-worker"
    assert "deploy" not in rendered["services"]["cpu-worker"]


def test_every_orchard_service_agrees_on_broker_store_and_artifacts(
    rendered: dict[str, Any],
) -> None:
    services = rendered["services"]
    data_dir = env_example()["ORCHARD_DATA_DIR"]
    seen = set()
    for name in ORCHARD_SERVICES:
        service = services[name]
        env = service["environment"]
        seen.add((env["ORCHARD_BROKER_URL"], env["ORCHARD_DATABASE_URL"]))
        assert env["ORCHARD_ARTIFACTS"] == f"{data_dir}/artifacts"
        assert f"orchard-data:{data_dir}" in service["volumes"], name
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    ((broker, database),) = seen
    assert broker.startswith("redis://:") and broker.endswith("@redis:6379/0")
    assert database.startswith("postgresql+psycopg://orchard:") and "@postgres:5432/" in database
    volume = rendered["volumes"]["orchard-data"]
    assert volume["driver_opts"] == {"type": "none", "o": "bind", "device": data_dir}
    # workers start only once the schema exists
    for name in ("cpu-worker", "gpu-worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["orchard", "db", "upgrade"]
    assert services["scheduler"]["profiles"] == ["tools"]


def test_dockerfile_installs_the_project() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("#") or any(line.startswith("FROM python:3.11") for line in lines)
    assert any(line.startswith("FROM python:3.11") for line in lines)
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in copied, f"docker/Dockerfile does not copy {package}"
    assert "pyproject.toml" in copied
    assert "RUN pip install ." in lines
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("CMD [") for line in lines)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)
