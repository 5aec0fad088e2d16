"""The deployment files, checked without a container engine (none runs here or in CI).

The compose file is validated against the compose-spec JSON schema (as written, and
again with .env.example's values substituted the way compose substitutes them), then
read as YAML for the properties the cluster relies on (no password in any command,
environment or healthcheck: they are Docker secrets). The Dockerfile is checked for
what the services need from it. The shell scripts the compose file gives Redis, its
healthcheck and Flower run here with `sh`, against a real redis-server. What this cannot
show, an image building or the containers starting, is said in the README's "Run on a
cluster".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis as pyredis
from ruamel.yaml import YAML

from shared.settings import mask_url
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ORCHARD_SERVICES = ("migrate", "flower", "cpu-worker", "gpu-worker", "cnn-cpu-worker", "scheduler")

# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR;
# a default may hold another (${A:-${B}}): the innermost matches first, the outer once
# that is substituted
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>(?:[^${}]|\$(?!\{))*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_LITERAL_DOLLAR = "\0"  # stands for $$ while nested forms are substituted


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
    text = text.replace("$$", _LITERAL_DOLLAR)
    while True:  # innermost first: each pass takes the forms the last one uncovered
        for match in _VARIABLE.finditer(text):
            name = match["name"] or match["bare"]
            if name:
                used.setdefault(name, set()).add(match["op"] or "")
        text, count = _VARIABLE.subn("x", text)
        if not count:
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

    text = text.replace("$$", _LITERAL_DOLLAR)
    while True:
        text, count = _VARIABLE.subn(substitute, text)
        if not count:
            return text.replace(_LITERAL_DOLLAR, "$")


def load(text: str) -> dict[str, Any]:
    return YAML(typ="safe").load(text)


def strings(node: Any) -> list[str]:
    """Every string in ``node`` (a command, an environment, a healthcheck), keys too."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def compose_strings() -> str:
    """Every string of the compose file, one per line: what compose interpolates (its
    comments it does not)."""
    return "\n".join(strings(load(COMPOSE.read_text())))


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
    used = variables_used(compose_strings())
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
    used = variables_used(compose_strings())
    for required in ("FLOWER_USER", "ORCHARD_DATA_DIR"):
        assert ":?" in used[required], f"{required} should be required (${{{required}:?...}})"
    env = env_example()
    del env["FLOWER_USER"]
    with pytest.raises(AssertionError, match="FLOWER_USER"):
        interpolate(COMPOSE.read_text(), env)


def secrets_of(service: dict[str, Any]) -> set[str]:
    """The secrets a service mounts (short syntax, or long with ``source``)."""
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


#: what `docker inspect` and `ps` show of a container: none of it may hold a password
SHOWN = ("command", "entrypoint", "environment", "healthcheck", "labels")


def test_no_password_in_commands_environments_or_healthchecks() -> None:
    """Passwords are Docker secrets, read from files inside the containers."""
    text = COMPOSE.read_text()
    compose = load(text)
    # no variable carries a password into the file at all
    secretive = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)
    assert [name for name in variables_used(compose_strings()) if secretive.search(name)] == []
    # nor does .env.example hold one
    assert [key for key in env_example() if secretive.search(key)] == []
    for name, service in compose["services"].items():
        for value in (s for key in SHOWN for s in strings(service.get(key))):
            assert not re.search(r"\$\{?\w*PASSWORD", value), f"{name}: {value}"
            # a URL names no password (orchard adds it from ORCHARD_*_PASSWORD_FILE)
            for url in re.findall(r"\w+(?:\+\w+)?://[^\s\"']+", value):
                # as compose hands it over: ${REDIS_PORT:-6379} is a port, not a password
                url = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", url)
                assert mask_url(url) == url, f"{name}: {url}"
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if secretive.search(key):
                # only the names of files: ORCHARD_*_PASSWORD_FILE, POSTGRES_PASSWORD_FILE
                assert key.endswith("_FILE"), f"{name}.{key}"
                assert value in ("", *(f"/run/secrets/{s}" for s in secrets_of(service)))
        # the variables that would hand a password over in the clear are gone
        assert not {"REDISCLI_AUTH", "FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD"} & set(environment)
    redis = compose["services"]["redis"]
    assert "--requirepass" not in strings(redis["command"])


def test_secrets_are_declared_and_mounted_where_used() -> None:
    compose = load(COMPOSE.read_text())
    declared = compose["secrets"]
    assert set(declared) == {"redis_password", "postgres_password", "flower_password"}
    for name, secret in declared.items():
        # files on the host, in the folder .gitignore keeps out of git
        assert secret == {"file": f"./secrets/{name}"}
    used: set[str] = set()
    for name, service in compose["services"].items():
        mounted = secrets_of(service)
        assert mounted <= set(declared), name
        used |= mounted
        # every secret a service reads (its command, healthcheck, *_FILE variables) is mounted
        read = {
            m
            for s in strings([service.get(k) for k in SHOWN])
            for m in re.findall(r"/run/secrets/(\w+)", s)
        }
        assert read <= mounted, f"{name} reads {sorted(read - mounted)} without mounting it"
    assert used == set(declared)  # and none is declared for nothing
    services = compose["services"]
    assert secrets_of(services["redis"]) == {"redis_password"}
    assert secrets_of(services["postgres"]) == {"postgres_password"}
    # Flower never opens the store, so it never sees the database's password
    assert secrets_of(services["flower"]) == {"redis_password", "flower_password"}
    ignored = (REPO / ".gitignore").read_text().split()
    assert "/secrets/" in ignored and ".env" in ignored


def test_orchard_services_read_their_passwords_from_the_secrets(rendered: dict[str, Any]) -> None:
    for name in ORCHARD_SERVICES:
        service = rendered["services"][name]
        env = service["environment"]
        assert env["ORCHARD_BROKER_PASSWORD_FILE"] == "/run/secrets/redis_password", name
        assert "redis_password" in secrets_of(service), name
        if name == "flower":
            assert env["ORCHARD_DATABASE_PASSWORD_FILE"] == ""
        else:
            assert env["ORCHARD_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
            assert "postgres_password" in secrets_of(service), name
    postgres = rendered["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_the_urls_a_container_builds_are_ones_orchard_takes(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    """What load_settings makes inside a worker from its environment and the secrets,
    with passwords no one could have written into a URL by hand."""
    from sqlalchemy.engine import make_url

    from shared.settings import load_settings
    from workers.config import broker_url_problem

    secrets = {"redis_password": 'r/e?d#i@s%:1 "x"\n', "postgres_password": "p@g/s?q#l%:\n"}
    for name, text in secrets.items():
        (tmp_path / name).write_text(text)
    env = {
        key: value.replace("/run/secrets", str(tmp_path))
        for key, value in rendered["services"]["cpu-worker"]["environment"].items()
    }
    settings = load_settings(env)
    assert broker_url_problem(settings.broker_url) is None
    assert mask_url(settings.broker_url) == "redis://:***@redis:6379/0"
    from kombu.utils.url import parse_url

    assert parse_url(settings.broker_url)["password"] == secrets["redis_password"].rstrip("\n")
    database = make_url(settings.database_url)
    assert database.password == secrets["postgres_password"].rstrip("\n")
    assert (database.username, database.host, database.port) == ("orchard", "postgres", 5432)


def test_services_and_their_roles(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert {"redis", "postgres", "flower", "cpu-worker", "gpu-worker"} <= set(services)
    shell, option, script = services["redis"]["command"]
    assert (shell, option) == ("sh", "-c")
    # the image's entrypoint, so that it still drops root; config on stdin, then options
    assert "exec docker-entrypoint.sh redis-server - --appendonly yes --save 60 1 <<EOF" in script
    assert "/run/secrets/redis_password" in script
    check = services["redis"]["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL" and "/run/secrets/redis_password" in check[1]
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
    shell, option, script = flower["command"]
    assert (shell, option) == ("sh", "-c")
    assert "exec celery -A workers.app flower --address=0.0.0.0 --port=5555" in script
    env = env_example()
    assert flower["environment"]["ORCHARD_FLOWER_USER"] == env["FLOWER_USER"]
    # Flower takes every FLOWER_* variable for an option and stops at one it does not know
    assert [key for key in flower["environment"] if key.startswith("FLOWER_")] == []
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    # with nothing set, the default is still localhost only
    defaults = render({k: v for k, v in env.items() if k not in ("FLOWER_BIND", "FLOWER_PORT")})
    assert defaults["services"]["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    # it watches the same broker as the workers, with the same password
    worker_env = rendered["services"]["cpu-worker"]["environment"]
    for key in ("ORCHARD_BROKER_URL", "ORCHARD_BROKER_PASSWORD_FILE"):
        assert flower["environment"][key] == worker_env[key]


def test_flower_keeps_a_bounded_history_with_options_it_knows(rendered: dict[str, Any]) -> None:
    """Flower's default of 100,000 tasks grew it to about 1.1 GB over weeks of campaigns,
    and it kept every worker name ever seen (each restart is a new one) for ever."""
    from flower.options import options

    script = rendered["services"]["flower"]["command"][2]
    given = dict(re.findall(r"--(\w+)=(\S+)", script))
    assert {"max_tasks": "10000", "purge_offline_workers": "86400"}.items() <= given.items()
    for name in given:
        assert name in options, name  # Flower stops at an option it does not know


def test_every_service_s_log_is_rotated(rendered: dict[str, Any]) -> None:
    for name, service in rendered["services"].items():
        logging = service.get("logging")
        assert logging == {
            "driver": "json-file",
            "options": {"max-size": "50m", "max-file": "5"},
        }, name


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
        assert set(service["secrets"]) >= {"redis_password"}, name
        assert env["ORCHARD_ARTIFACTS"] == f"{data_dir}/artifacts"
        # datasets from where every container sees them, unless .env says otherwise
        assert env["ORCHARD_DATASET_ROOTS"] == data_dir, name
        # the host folder itself, at its own path, read from .env at every `up`
        assert {
            "type": "bind",
            "source": data_dir,
            "target": data_dir,
            "bind": {"create_host_path": False},
        } in service["volumes"], name
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    ((broker, database),) = seen
    assert broker == "redis://redis:6379/0"
    assert database == "postgresql+psycopg://orchard@postgres:5432/orchard"
    assert "orchard-data" not in rendered["volumes"]  # a named volume keeps its first path
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
    # torch pinned to the release the project is tested with, not PyPI's newest
    pinned = {
        line.split("=", 1)[0].split()[1]: line.split("=", 1)[1]
        for line in lines
        if line.startswith("ARG ") and "=" in line
    }
    assert (pinned["TORCH_VERSION"], pinned["TORCHVISION_VERSION"]) == ("2.14.1", "0.29.1")
    assert text.count('"torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"') == 2
    assert text.index("torch==$TORCH_VERSION") < text.index("RUN pip install .")
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("CMD [") for line in lines)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


# ---------------------------------------------------------------- the services' shell scripts
# No engine runs here, but the scripts the compose file gives redis, its healthcheck and
# Flower are plain POSIX sh: they run here against a real redis-server, with the secret
# in a temporary file and the image's entrypoint replaced by one that only adds a port.

#: a password that would break a URL, a shell line and a Redis config string
AWKWARD = "p/w?#@%:\"' $x\\y;`"


def run_script(script: str, secrets: Path, path: Path, **env: str) -> subprocess.Popen[str]:
    script = script.replace("/run/secrets", str(secrets))
    return subprocess.Popen(
        ["sh", "-c", script],
        env={**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir()
    for name in ("redis_password", "flower_password"):
        (folder / name).write_text(AWKWARD + "\n")
    return folder


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_takes_its_password_from_the_secret(
    rendered: dict[str, Any], secrets_dir: Path, tmp_path: Path
) -> None:
    from shared.settings import load_settings
    from workers.app import check_broker_reachable, make_app

    port = free_port()
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "docker-entrypoint.sh", f'exec "$@" --port {port} --dir {tmp_path}')
    redis = rendered["services"]["redis"]
    server = run_script(redis["command"][2], secrets_dir, bin_dir)
    try:
        client = pyredis.Redis(port=port, password=AWKWARD, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except pyredis.ConnectionError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        # the password is required, and appears in no command line
        with pytest.raises(pyredis.AuthenticationError):
            pyredis.Redis(port=port).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": "60 1"}
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert "redis-server" in cmdline and "p/w" not in cmdline
        # the healthcheck authenticates with the secret
        check = redis["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
        healthy = run_script(check, secrets_dir, bin_dir)
        assert healthy.wait(timeout=10) == 0, healthy.stdout.read()
        (tmp_path / "wrong").mkdir()
        (tmp_path / "wrong" / "redis_password").write_text("wrong\n")
        unhealthy = run_script(check, tmp_path / "wrong", bin_dir)
        assert unhealthy.wait(timeout=10) != 0
        # and a worker's settings, from the same secret, reach it through orchard's check
        settings = load_settings(
            {
                "ORCHARD_HOME": str(tmp_path),
                "ORCHARD_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                "ORCHARD_BROKER_PASSWORD_FILE": str(secrets_dir / "redis_password"),
            }
        )
        check_broker_reachable(make_app(settings, with_tasks=False))
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_redis_refuses_an_empty_secret(
    rendered: dict[str, Any], secrets_dir: Path, tmp_path: Path
) -> None:
    """An empty requirepass would be no password at all."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "docker-entrypoint.sh", "echo started; exit 0")
    (secrets_dir / "redis_password").write_text("\n")
    server = run_script(rendered["services"]["redis"]["command"][2], secrets_dir, bin_dir)
    assert server.wait(timeout=10) == 1
    assert server.stdout.read() == "redis: the secret redis_password is empty\n"


def test_flower_gets_its_login_from_the_secret(
    rendered: dict[str, Any], secrets_dir: Path, tmp_path: Path
) -> None:
    flower = rendered["services"]["flower"]
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "celery", 'printf "%s\\n" "$FLOWER_BASIC_AUTH" "$*"')
    user = flower["environment"]["ORCHARD_FLOWER_USER"]
    done = run_script(flower["command"][2], secrets_dir, bin_dir, ORCHARD_FLOWER_USER=user)
    assert done.wait(timeout=10) == 0
    login, argv = done.stdout.read().splitlines()
    assert login == f"{user}:{AWKWARD}"
    assert argv == (
        "-A workers.app flower --address=0.0.0.0 --port=5555 --url_prefix= --max_tasks=10000 "
        "--purge_offline_workers=86400"
    )
    (secrets_dir / "flower_password").write_text("")
    refused = run_script(flower["command"][2], secrets_dir, bin_dir, ORCHARD_FLOWER_USER=user)
    assert refused.wait(timeout=10) == 1
    # Flower splits FLOWER_BASIC_AUTH at ',': "a,b" would let in "a" and refuse "a,b"
    (secrets_dir / "flower_password").write_text("first,second\n")
    refused = run_script(flower["command"][2], secrets_dir, bin_dir, ORCHARD_FLOWER_USER=user)
    assert refused.wait(timeout=10) == 1
    assert refused.stdout is not None
    assert refused.stdout.read() == (
        "flower: FLOWER_USER or the secret flower_password has a ',' in it: Flower would cut "
        "the login there\n"
    )


@pytest.mark.parametrize("prefix", ["", "flower", "/flower/"])
def test_flower_under_a_path_is_started_and_checked_there(
    rendered: dict[str, Any], secrets_dir: Path, tmp_path: Path, prefix: str
) -> None:
    """FLOWER_URL_PREFIX (Flower behind a proxy at https://host/flower/): Flower gets it,
    and the healthcheck asks for /healthcheck under it, where Flower then serves it."""
    import http.server
    import threading

    flower = rendered["services"]["flower"]
    env = env_example() | {"FLOWER_URL_PREFIX": prefix}
    assert render(env)["services"]["flower"]["environment"]["ORCHARD_FLOWER_URL_PREFIX"] == prefix
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "celery", 'printf "%s\\n" "$*"')
    done = run_script(flower["command"][2], secrets_dir, bin_dir, ORCHARD_FLOWER_URL_PREFIX=prefix)
    assert done.wait(timeout=10) == 0
    assert done.stdout is not None
    assert f"--url_prefix={prefix} " in done.stdout.read()

    served = "/flower/healthcheck" if prefix else "/healthcheck"

    class Flower(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == served else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Flower)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kind, *check = flower["healthcheck"]["test"]
        assert kind == "CMD" and check[0] == "python"
        script = check[-1].replace("127.0.0.1:5555", f"127.0.0.1:{server.server_port}")
        for asked, healthy in ((prefix, True), ("elsewhere" if prefix else "flower", False)):
            env_of = {**os.environ, "ORCHARD_FLOWER_URL_PREFIX": asked}
            ran = subprocess.run(
                [sys.executable, *check[1:-1], script], env=env_of, capture_output=True
            )
            assert (ran.returncode == 0) is healthy, (asked, served)
    finally:
        server.shutdown()
        server.server_close()
