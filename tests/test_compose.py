"""docker-compose.yml, Dockerfile and .dockerignore, checked against the code.

No Docker engine runs here, so these tests read the files and compare them with what the
code declares: the worker registry, the CLI's commands and arguments, the settings'
fields, the console script, and the packages setuptools installs. No broker or database.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet

from cli.catalog import read_catalog
from cli.main import app
from services.provisioning.providers import SECRET_ENVIRONMENT
from services.registry import WORKERS
from shared.parties import amqp_user
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPT = "ordermill"
AMQP_PORT, POSTGRES_PORT = 5672, 5432
# shared/runtime/process.py, Runtime._shutdown: in-flight messages get 30 s, background tasks 10 s more.
DRAIN_SECONDS = 30 + 10


# -- the Dockerfile ------------------------------------------------------------------------

@dataclass
class Copy:
    sources: list[str]  # context paths
    dest: str  # absolute path in the image
    into_dir: bool


@dataclass
class Image:
    base: str = ""
    workdir: str = "/"
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    # In order: ("copy", Copy) or ("run", command, workdir at that point).
    steps: list[tuple[Any, ...]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        name, _, args = (pending + line).strip().partition(" ")
        out.append((name.upper(), args.strip()))
        pending = ""
    return out


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


@cache
def image() -> Image:
    instructions = _instructions((ROOT / "Dockerfile").read_text())
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    img = Image(base=instructions[last_from][1].split()[0])
    for name, args in instructions[last_from + 1:]:
        if name == "WORKDIR":
            img.workdir = posixpath.normpath(posixpath.join(img.workdir, args))
        elif name == "USER":
            img.user = args
        elif name == "ENTRYPOINT":
            img.entrypoint, img.cmd = _exec_form(args), []  # as Docker: resets the inherited CMD
        elif name == "CMD":
            img.cmd = _exec_form(args)
        elif name == "RUN":
            img.steps.append(("run", args, img.workdir))
        elif name in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue  # not from the build context
            words = [w for w in words if not w.startswith("--")]
            *sources, dest = words
            into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
            img.steps.append(("copy", Copy(sources, posixpath.normpath(
                posixpath.join(img.workdir, dest)), into_dir)))
    return img


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception `!...`, pattern), in order; Docker's last match wins."""
    path = ROOT / ".dockerignore"
    patterns = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1].replace("[!", "[^"), end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((keep, re.compile(regex)))
    return patterns


def ignored(rel: str) -> bool:
    """Whether .dockerignore leaves this context path out (it, or a parent directory, matches)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for keep, pattern in _dockerignore():
        if any(pattern.fullmatch(c) for c in candidates):
            result = not keep
    return result


def copied_to(rel: str, *, before: int | None = None) -> set[str]:
    """Where the context file `rel` lands in the image (by the COPY steps before step `before`)."""
    if ignored(rel):
        return set()
    found = set()
    for step in image().steps[:before]:
        if step[0] != "copy":
            continue
        copy: Copy = step[1]
        for src in copy.sources:
            src = posixpath.normpath(src)
            if (ROOT / src).is_dir() and (src == "." or rel.startswith(src + "/")):
                # A directory's contents are copied, not the directory itself.
                found.add(posixpath.join(copy.dest, posixpath.relpath(rel, src)))
            elif src == rel:
                found.add(posixpath.join(copy.dest, posixpath.basename(rel)) if copy.into_dir
                          else copy.dest)
    return found


# -- the compose file ----------------------------------------------------------------------

@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def app_services() -> dict[str, dict[str, Any]]:
    """The services running this repository's image: built from ./Dockerfile, or that image."""
    built = {}
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        context, dockerfile = ((build, "Dockerfile") if isinstance(build, str)
                               else (build.get("context", "."), build.get("dockerfile", "Dockerfile")))
        assert (ROOT / context).resolve() == ROOT and dockerfile == "Dockerfile", \
            f"{name} builds {context}/{dockerfile}, not this repository's Dockerfile"
        built[name] = svc
    images = {svc["image"] for svc in built.values() if "image" in svc}
    return {name: svc for name, svc in services().items()
            if name in built or svc.get("image") in images}


def _words(value: str | list[Any] | None) -> list[str] | None:
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def invocations(name: str) -> list[list[str]]:
    """The `ordermill` argument lists a container runs, in order."""
    svc = services()[name]
    entrypoint, command = _words(svc.get("entrypoint")), _words(svc.get("command"))
    if entrypoint is None:
        entrypoint = image().entrypoint
        command = image().cmd if command is None else command
    argv = entrypoint + (command or [])
    if argv[:1] == [SCRIPT]:
        return [argv[1:]]
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"]):
        script = argv[2]
        # Steps joined by && only: a failed step must fail the container.
        assert not re.search(r";|\|\||\||\n", script.strip()), \
            f"{name}: join the steps of {script!r} with && so that a failure stops it"
        steps = [shlex.split(step) for step in script.split("&&")]
        steps = [s[1:] if s[:1] == ["exec"] else s for s in steps]
        assert all(s[:1] == [SCRIPT] for s in steps), f"{name}: {script!r} runs more than {SCRIPT}"
        return [s[1:] for s in steps]
    pytest.fail(f"{name} runs {argv}, not {SCRIPT}")


def parse_cli(args: list[str]) -> tuple[str, dict[str, Any]]:
    """('catalog load', parsed parameters) as the CLI itself parses these arguments."""
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while isinstance(command, typer.core.TyperGroup):
        assert rest, f"`{SCRIPT} {' '.join(path)}` needs a subcommand"
        word = rest.pop(0)
        assert word in command.commands, \
            f"`{SCRIPT} {' '.join([*path, word])}`: no such command (known: {sorted(command.commands)})"
        command, path = command.commands[word], [*path, word]
    try:
        params = command.make_context(" ".join(path), rest).params
    except Exception as exc:
        pytest.fail(f"`{SCRIPT} {' '.join(args)}`: {exc}")
    return " ".join(path), params


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}`, as on a host where none of those variables is set."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", value)


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else interpolate(str(v)) for k, v in env.items()}


def settings_of(svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the container gets, parsed by pydantic-settings from its environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in environment(svc).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return Settings()


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    out = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), int(port.get("published", port["target"])),
                        int(port["target"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("0.0.0.0", int(parts[0]), int(parts[1])))
    return out


def seconds(duration: str | int | None) -> float:
    if duration is None:
        return 10.0  # compose's default stop_grace_period
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    found = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert found, f"cannot read the duration {duration!r}"
    return sum(float(n) * units[u] for n, u in found)


def worker_containers() -> dict[str, list[str]]:
    """Container name -> the workers it runs."""
    out = {}
    for name in app_services():
        for path, params in map(parse_cli, invocations(name)):
            if path == "run":
                out[name] = list(params["services"] or [])
    return out


def migrate_service() -> str:
    names = [n for n in app_services() if any(parse_cli(a)[0] == "migrate" for a in invocations(n))]
    assert len(names) == 1, f"one container should run `{SCRIPT} migrate`, found {names}"
    return names[0]


def server(url: str, image_name: str) -> tuple[str, dict[str, Any]]:
    """The service a URL's host names, which must run the given image."""
    host = urlsplit(url).hostname
    assert host in services(), f"{url}: host {host!r} is no service of the compose file"
    svc = services()[host]
    assert str(svc.get("image", "")).split(":")[0] == image_name, \
        f"{url} points at {host!r}, which runs {svc.get('image')!r}, not {image_name}"
    return host, svc


def only_service(image_name: str) -> dict[str, Any]:
    found = [svc for svc in services().values() if str(svc.get("image", "")).split(":")[0] == image_name]
    assert len(found) == 1, f"expected one {image_name} service, found {len(found)}"
    return found[0]


def reachable_at(svc: dict[str, Any], host: str | None, port: int, target: int) -> bool:
    """Whether the service publishes its port `target` at host:port."""
    return any(ip in (host, "0.0.0.0") and published_port == port and t == target
               for ip, published_port, t in published(svc))


# -- tests ---------------------------------------------------------------------------------

def test_every_app_container_runs_a_real_ordermill_command() -> None:
    assert app_services(), "no service runs the Ordermill image"
    for name in app_services():
        for args in invocations(name):
            assert args, f"{name}: `{SCRIPT}` without a command only prints help"
            parse_cli(args)  # fails on an unknown command, option or a missing argument


def test_one_container_per_registered_worker() -> None:
    containers = worker_containers()
    for name, workers in containers.items():
        assert workers, f"{name}: `{SCRIPT} run` without names runs every worker in one container"
        unknown = set(workers) - set(WORKERS)
        assert not unknown, f"{name} runs {sorted(unknown)}, not in services.registry.WORKERS"
    covered = {w for workers in containers.values() for w in workers}
    assert covered == set(WORKERS), f"workers without a container: {sorted(set(WORKERS) - covered)}"


def test_environment_is_settings_the_code_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    known = {prefix + f for f in Settings.model_fields}
    if not Settings.model_config.get("case_sensitive", False):
        known = {k.upper() for k in known}
    # Secrets are read from the environment by name, not through Settings: the catalog's
    # servers name their token variables, and the registrars theirs.
    catalog = read_catalog(ROOT / "catalog.example.toml")
    known |= {s.token_env for s in catalog.servers if s.token_env} | set(SECRET_ENVIRONMENT)
    for name, svc in app_services().items():
        for var in environment(svc):
            assert var in known, f"{name}: {var} is no setting of shared.settings.Settings (ignored)"
        settings_of(svc, monkeypatch)  # and the values are valid


def test_app_containers_share_servers_and_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {name: (s.amqp_url, s.database_url, s.namespace)
            for name, s in ((n, settings_of(svc, monkeypatch)) for n, svc in app_services().items())}
    assert len(set(seen.values())) == 1, f"containers disagree on broker, database or namespace: {seen}"


def test_amqp_url_matches_the_rabbitmq_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in app_services().items():
        url = urlsplit(settings_of(svc, monkeypatch).amqp_url)
        _, rabbit = server(url.geturl(), "rabbitmq")
        env = environment(rabbit)
        assert (url.port or AMQP_PORT) == AMQP_PORT, f"{name}: RabbitMQ listens on {AMQP_PORT}"
        assert (unquote(url.username or ""), unquote(url.password or "")) == (
            env.get("RABBITMQ_DEFAULT_USER") or "guest", env.get("RABBITMQ_DEFAULT_PASS") or "guest"), \
            f"{name}: AMQP_URL credentials differ from RABBITMQ_DEFAULT_USER/RABBITMQ_DEFAULT_PASS"
        assert (unquote(url.path[1:]) or "/") == (env.get("RABBITMQ_DEFAULT_VHOST") or "/"), \
            f"{name}: AMQP_URL names another virtual host than RABBITMQ_DEFAULT_VHOST"


def test_database_url_matches_the_postgres_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in app_services().items():
        url = urlsplit(settings_of(svc, monkeypatch).database_url)
        _, postgres = server(url.geturl(), "postgres")
        env = environment(postgres)
        assert (url.port or POSTGRES_PORT) == POSTGRES_PORT, f"{name}: PostgreSQL listens on 5432"
        assert url.username == (env.get("POSTGRES_USER") or "postgres"), \
            f"{name}: DATABASE_URL's user is not the server's POSTGRES_USER"
        if env.get("POSTGRES_HOST_AUTH_METHOD") != "trust":
            assert env.get("POSTGRES_PASSWORD"), "postgres needs POSTGRES_PASSWORD or trust to start"
            assert unquote(url.password or "") == env["POSTGRES_PASSWORD"], \
                f"{name}: DATABASE_URL's password is not POSTGRES_PASSWORD"
        assert url.path.strip("/"), f"{name}: DATABASE_URL names no database"


def test_servers_serve_the_quick_start_defaults() -> None:
    """`docker compose up -d rabbitmq postgres` gives what the settings' defaults expect."""
    amqp = urlsplit(Settings.model_fields["amqp_url"].default)
    rabbit = only_service("rabbitmq")
    env = environment(rabbit)
    assert (amqp.username, amqp.password) == (env.get("RABBITMQ_DEFAULT_USER") or "guest",
                                              env.get("RABBITMQ_DEFAULT_PASS") or "guest"), \
        "the default AMQP_URL's credentials (README quick start) do not log in to this RabbitMQ"
    assert reachable_at(rabbit, amqp.hostname, amqp.port or AMQP_PORT, AMQP_PORT), \
        f"rabbitmq should publish {amqp.hostname}:{amqp.port or AMQP_PORT}"

    db = urlsplit(Settings.model_fields["database_url"].default)
    postgres = only_service("postgres")
    env = environment(postgres)
    assert db.username == (env.get("POSTGRES_USER") or "postgres")
    assert env.get("POSTGRES_HOST_AUTH_METHOD") == "trust" or db.password == env.get("POSTGRES_PASSWORD"), \
        "the default DATABASE_URL's password does not log in to this PostgreSQL"
    assert reachable_at(postgres, db.hostname, db.port or POSTGRES_PORT, POSTGRES_PORT), \
        f"postgres should publish {db.hostname}:{db.port or POSTGRES_PORT}"


def test_migrate_waits_for_healthy_servers_then_loads_a_shipped_catalog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = migrate_service()
    svc = services()[name]
    steps = [parse_cli(args) for args in invocations(name)]
    assert steps[0][0] == "migrate", f"{name}: migrate first, then anything that needs the schema"
    loads = [params for path, params in steps if path == "catalog load"]
    assert loads, f"{name} loads no catalog"
    workdir = svc.get("working_dir", image().workdir)
    for params in loads:
        in_image = posixpath.normpath(posixpath.join(workdir, str(params["file"])))
        rel = posixpath.relpath(in_image, workdir)  # the same path in the repository
        assert not rel.startswith(".."), f"{name} loads {in_image}, outside the working directory"
        assert (ROOT / rel).is_file(), f"{name} loads {rel}, which the repository lacks"
        read_catalog(ROOT / rel)  # a valid catalog, not only a file
        assert in_image in copied_to(rel), f"the Dockerfile does not copy {rel} to {in_image}"

    s = settings_of(svc, monkeypatch)
    for url, kind in ((s.amqp_url, "rabbitmq"), (s.database_url, "postgres")):
        host, srv = server(url, kind)
        assert depends_on(svc).get(host) == "service_healthy", \
            f"{name} must wait for {host} to be healthy, not only started"
        check = srv.get("healthcheck") or {}
        assert check.get("test") and check["test"] != ["NONE"] and not check.get("disable"), \
            f"{host} needs a healthcheck for service_healthy to mean anything"
    assert svc.get("restart", "no") == "no", f"{name} is one-shot: a restart policy keeps it from completing"


def test_workers_start_after_migrate_restart_and_drain() -> None:
    migrate = migrate_service()
    for name in worker_containers():
        svc = services()[name]
        assert depends_on(svc).get(migrate) == "service_completed_successfully", \
            f"{name} must start only once {migrate} has succeeded"
        assert svc.get("restart") in ("unless-stopped", "always"), f"{name}: a crashed worker stays down"
        assert seconds(svc.get("stop_grace_period")) >= DRAIN_SECONDS, \
            f"{name}: docker kills it before the runtime has drained in-flight work"


def test_workers_are_healthy_only_while_their_heartbeat_is_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in worker_containers():
        svc = services()[name]
        s = settings_of(svc, monkeypatch)
        assert s.heartbeat_file, f"{name}: no HEARTBEAT_FILE, so its health check has nothing to read"
        check = svc.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name} has no health check"
        command = " ".join(check["test"][1:]).replace("$$", "$")
        assert s.heartbeat_file in command, f"{name}: the health check reads another file"
        age = int(re.search(r"-lt (\d+)", command).group(1))
        assert 2 * s.heartbeat_seconds < age <= 6 * s.heartbeat_seconds, \
            f"{name}: a heartbeat older than {age} s is unhealthy, beats come every {s.heartbeat_seconds} s"
    assert (services()[migrate_service()].get("healthcheck") or {}).get("disable"), \
        "the one-shot migrate writes no heartbeat: its health check would fail"


def test_mail_goes_to_a_server_of_the_compose_file_unless_the_host_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`localhost` in the notify container is the container itself: no mail server there."""
    for var in ("SMTP_HOST", "SMTP_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = settings_of(services()["notify"], monkeypatch)
    server(f"smtp://{s.smtp_host}:{s.smtp_port}", "axllent/mailpit")
    assert s.smtp_port == 1025  # mailpit's SMTP port
    # The host's settings for a real relay reach the container (some were fixed, or left out).
    raw = services()["notify"]["environment"]
    for var in ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USERNAME", "SMTP_PASSWORD",
                "SMTP_CONNECTIONS", "MAIL_FROM"):
        assert str(raw.get(var, "")).startswith("${" + var + ":-"), f"notify: {var} is not the host's"


def test_named_volumes_are_declared_and_rabbitmq_keeps_its_node_name() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for volume in svc.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses the undeclared volume {source!r}"
            target = volume.get("target") if isinstance(volume, dict) else str(volume).split(":")[1]
            if target == "/var/lib/rabbitmq":
                # Its data lives under the node name rabbit@<hostname>; a random hostname loses it.
                assert svc.get("hostname"), f"{name} keeps data but has no fixed hostname"


WAL_CONF = "/etc/rabbitmq/conf.d/10-quorum-wal.conf"


def test_rabbitmq_rolls_its_quorum_queues_log_at_64_mib() -> None:
    """At 512 MiB (RabbitMQ's default) each roll paused the pipeline 0.3-0.5 s; the file
    mounted sets 64 MiB (tests/test_broker_config.py boots a real node with it)."""
    binds = {parts[1]: parts for m in services()["rabbitmq"]["volumes"]
             if (parts := str(m).split(":"))[0].startswith("./")}
    source, _, *mode = binds[WAL_CONF]
    assert mode == ["ro"]
    text = (ROOT / source).read_text()
    assert re.findall(r"^raft\.wal_max_size_bytes\s*=\s*(\d+)\s*$", text, re.M) == [str(64 * 2**20)]


def test_entrypoint_is_the_console_script_run_as_non_root() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert SCRIPT in scripts
    module, _, attr = scripts[SCRIPT].partition(":")
    assert callable(getattr(import_module(module), attr))
    img = image()
    assert img.entrypoint == [SCRIPT], \
        f"ENTRYPOINT should be the exec form [{SCRIPT!r}], not {img.entrypoint}"
    assert img.user and img.user.split(":")[0] not in ("root", "0"), "the image runs as root"
    base, _, tag = img.base.partition(":")
    version = re.match(r"\d+\.\d+", tag)
    assert base == "python" and version, f"unexpected base image {img.base}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version.group() + ".0"), \
        f"{img.base} does not satisfy requires-python"


def test_dockerfile_installs_every_package_without_test_extras() -> None:
    installs = []  # (step index, local path installed, working directory)
    for index, step in enumerate(image().steps):
        if step[0] != "run":
            continue
        for args in re.findall(r"\bpip install\b([^&;|]*)", step[1]):
            for word in shlex.split(args):
                if word.startswith((".", "/")):
                    installs.append((index, word, step[2]))
    assert len(installs) == 1, f"expected one `pip install` of the project, found {installs}"
    index, target, workdir = installs[0]
    assert "[" not in target, f"install the project without extras, not {target}"
    project = posixpath.normpath(posixpath.join(workdir, target))

    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.name for p in ROOT.iterdir()
                if p.is_dir() and any(fnmatch.fnmatch(p.name, pattern) for pattern in include)]
    assert packages
    files = ["pyproject.toml"] + [
        f.relative_to(ROOT).as_posix() for package in packages for f in (ROOT / package).rglob("*")
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    for rel in files:
        assert posixpath.join(project, rel) in copied_to(rel, before=index), \
            f"{rel} is not at {posixpath.join(project, rel)} when `pip install` runs"


def test_build_context_leaves_out_the_virtualenv_and_git() -> None:
    for rel in (".venv/bin/python", ".git/config", "ordermill.egg-info/PKG-INFO"):
        assert ignored(rel), f".dockerignore should leave out {rel.split('/')[0]}"


# -- the production overlay: a RabbitMQ user per party ------------------------------------------

def _merged(base: Any, extra: Any) -> Any:
    """Compose's merge of a second file: mappings merged key by key, sequences appended."""
    if isinstance(base, dict) and isinstance(extra, dict):
        return {k: _merged(base[k], extra[k]) if k in base and k in extra else
                extra.get(k, base.get(k)) for k in {**base, **extra}}
    if isinstance(base, list) and isinstance(extra, list):
        return base + extra
    return extra


def test_the_production_overlay_runs_each_worker_as_its_own_broker_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from cli.broker_users import plan_users
    from shared.parties import Party, Publishers, UnknownPublishers
    from shared.runtime import Runtime
    from shared.topology import Names

    overlay = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text())
    merged = _merged(compose(), overlay)["services"]
    # The users the overlay's own instructions make (`ordermill broker users --admin ...`).
    planned = {u.service or ("admin" if u.party is None else u.name): u.name for u in plan_users(
        Names("ordermill"), prefix="ordermill", admin="ordermill-admin", storefronts=["shop1"],
        gateways=["stripe"], operators=["alice"], consoles=[])}
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    containers = {**{name: run[0] for name, run in worker_containers().items()},
                  migrate_service(): "admin"}
    assert set(WORKERS) <= set(containers.values())
    for name, role in containers.items():
        svc, user = merged[name], planned[role]
        env = environment(svc)
        assert urlsplit(env["AMQP_URL"]).username == user, name
        assert urlsplit(env["AMQP_URL"]).password is None, f"{name}: a password in AMQP_URL"
        assert env["AMQP_PASSWORD_FILE"] == f"/run/secrets/{user}" and user in svc["secrets"]
        # The secret is the file `broker users --secrets-dir deploy/broker/secrets` writes.
        assert overlay["secrets"][user]["file"] == f"./deploy/broker/secrets/{user}.password"
        monkeypatch.setenv("AMQP_PASSWORD_FILE", str(password))
        s = settings_of({"environment": {**env, "AMQP_PASSWORD_FILE": str(password)}},
                        monkeypatch)
        assert urlsplit(s.amqp_url).username == user
        assert unquote(urlsplit(s.amqp_url).password or "") == "s3cret"
        if role == "admin":
            continue
        assert Publishers.from_settings(s.publishers).users[Party.SERVICE] == {
            v for k, v in planned.items() if k in WORKERS}
        runtime, spec = Runtime(s), WORKERS[role](s)
        if role in ("placement", "review", "provisioning"):
            # The host named no storefront, gateway or operator: closed, one line.
            with pytest.raises(UnknownPublishers, match=r"STOREFRONT_USERS|OPERATOR_USERS|"
                               r"PAYMENT_PUBLISHERS"):
                runtime.check_publishers([spec])
        runtime = Runtime(s.model_copy(update={"storefront_users": ["shop1"],
                                               "payment_publishers": ["stripe"],
                                               "operator_users": ["alice"]}))
        runtime.check_publishers([spec])
    # RabbitMQ loads the mounted definitions at boot.
    mounts = {m.split(":")[1]: m.split(":")[0] for m in merged["rabbitmq"]["volumes"]
              if m.startswith("./")}
    conf = mounts["/etc/rabbitmq/conf.d/20-ordermill.conf"]
    assert WAL_CONF in mounts  # the base file's, kept
    loaded = re.search(r"^load_definitions\s*=\s*(\S+)", (ROOT / conf).read_text(), re.M)
    assert loaded and mounts[loaded.group(1)] == "./deploy/broker/definitions.json"
    assert "deploy/broker/" in (ROOT / ".gitignore").read_text().splitlines()


# -- the monitoring profile ------------------------------------------------------------------

MONITORING = ("prometheus", "grafana", "exporter")


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume; sources of bind mounts stay as written (./...)."""
    out = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            source, target = str(volume).split(":")[:2]
            out.append((source, target))
    return out


def _in_container(svc: dict[str, Any], path: str) -> Path | None:
    """The repository file a container path is mounted from (a file, or inside a directory)."""
    for source, target in _mounts(svc):
        if not source.startswith("./"):
            continue
        if path == target:
            return ROOT / source
        if path.startswith(target.rstrip("/") + "/"):
            return ROOT / source / path[len(target.rstrip("/")) + 1:]
    return None


def test_the_monitoring_profile_runs_prometheus_grafana_and_the_exporter() -> None:
    svcs = services()
    for name in MONITORING:
        assert name in svcs, f"no {name} service"
        assert svcs[name].get("profiles") == ["monitoring"], f"{name} is not (only) in the profile"
    # Without the profile, nothing of it starts, and no worker waits for it.
    for name, svc in svcs.items():
        if "monitoring" not in (svc.get("profiles") or []):
            assert not set(depends_on(svc)) & set(MONITORING), f"{name} needs the profile"
    assert str(svcs["prometheus"]["image"]).startswith("prom/prometheus:")
    assert str(svcs["grafana"]["image"]).startswith("grafana/grafana")
    assert parse_cli(invocations("exporter")[0])[0] == "exporter"
    # Their UIs on localhost only.
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        assert published(svcs[name]) == [("127.0.0.1", port, port)], name
    # Every file mounted from the repository exists.
    for name in MONITORING:
        for source, _ in _mounts(svcs[name]):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_prometheus_loads_the_shipped_rules_and_grafana_the_dashboard() -> None:
    prom = services()["prometheus"]
    args = prom.get("command") or []
    config_path = next(a.split("=", 1)[1] for a in args if a.startswith("--config.file="))
    config_file = _in_container(prom, config_path)
    assert config_file and config_file.is_file(), f"{config_path} is not mounted from the repository"
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:
        mounted = _in_container(prom, rule_file)
        assert mounted and mounted.is_file(), f"rule file {rule_file} is not mounted"
        assert yaml.safe_load(mounted.read_text())["groups"]
    grafana = services()["grafana"]
    provisioning = _in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning and (provisioning / "datasources").is_dir()
    for provider_file in (provisioning / "dashboards").glob("*.yml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            folder = _in_container(grafana, provider["options"]["path"])
            assert folder and list(folder.glob("*.json")), f"no dashboard at {provider['options']}"
            for board in folder.glob("*.json"):
                json.loads(board.read_text())
    datasource = yaml.safe_load(next((provisioning / "datasources").glob("*.yml")).read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090


def _scrape_targets() -> dict[str, set[int]]:
    """host name -> ports Prometheus scrapes there (static targets and DNS names)."""
    config = yaml.safe_load(
        (ROOT / "deploy/monitoring/prometheus/prometheus.yml").read_text())
    targets: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.setdefault(host, set()).add(int(port))
        for dns in job.get("dns_sd_configs") or []:
            assert dns.get("type", "SRV") == "A", "compose names resolve as A records"
            for name in dns["names"]:
                targets.setdefault(name, set()).add(int(dns["port"]))
    return targets


def test_every_worker_serves_metrics_and_prometheus_scrapes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    targets = _scrape_targets()
    for name in worker_containers():
        s = settings_of(services()[name], monkeypatch)
        assert s.metrics_port, f"{name}: no METRICS_PORT, so no /metrics"
        assert s.metrics_host == "0.0.0.0", f"{name}: /metrics on {s.metrics_host}, unreachable"
        assert s.metrics_port in targets.get(name, set()), \
            f"{name}: Prometheus does not scrape {name}:{s.metrics_port}"
        assert not [p for p in published(services()[name]) if p[2] == s.metrics_port], \
            f"{name}: the metrics port is published beyond the compose network"
    exporter = parse_cli(invocations("exporter")[0])[1]
    assert exporter["host"] == "0.0.0.0"
    assert exporter["port"] in targets.get("exporter", set()), "Prometheus does not scrape the exporter"
    probe = " ".join(services()["exporter"]["healthcheck"]["test"])
    assert f":{exporter['port']}/metrics" in probe, "the exporter's health check asks another port"


# -- the console --------------------------------------------------------------------------------

def test_the_console_serves_on_the_hosts_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    consoles = [name for name in app_services()
                if any(parse_cli(args)[0] == "console" for args in invocations(name))]
    assert consoles == ["console"], f"one container should run `{SCRIPT} console`: {consoles}"
    svc = services()["console"]
    ((_, params),) = map(parse_cli, invocations("console"))
    s = settings_of(svc, monkeypatch)
    port = params["port"] if params["port"] is not None else s.console_port
    assert (params["host"] or s.console_host) == "0.0.0.0", \
        "in a container the console must listen on every interface to be published"
    ports = published(svc)
    assert ports and all(ip == "127.0.0.1" for ip, _, _ in ports), \
        f"the console is published beyond the host's loopback: {ports}"
    assert [target for _, _, target in ports] == [port]
    check = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/" in check, "the health check asks another port"
    assert depends_on(svc).get(migrate_service()) == "service_completed_successfully"
    # History names the operator signed in only for a console user that is no operator.
    assert amqp_user(s.amqp_url) in s.console_users
    assert amqp_user(s.amqp_url) not in s.operator_users


def test_the_production_overlay_gives_the_console_its_own_broker_user() -> None:
    from cli.broker_users import plan_users
    from shared.topology import Names

    overlay = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text())
    merged = _merged(compose(), overlay)["services"]["console"]
    (user,) = [u.name for u in plan_users(
        Names("ordermill"), prefix="ordermill", admin=None, storefronts=[], gateways=[],
        operators=[], consoles=["ordermill-console"]) if u.name == "ordermill-console"]
    env = environment(merged)
    assert urlsplit(env["AMQP_URL"]).username == user and urlsplit(env["AMQP_URL"]).password is None
    assert env["AMQP_PASSWORD_FILE"] == f"/run/secrets/{user}" and user in merged["secrets"]
    assert overlay["secrets"][user]["file"] == f"./deploy/broker/secrets/{user}.password"
    raw = overlay["services"]["console"]["environment"]["CONSOLE_SECRET_KEY"]
    assert raw.startswith("${CONSOLE_SECRET_KEY:?"), "production must refuse to start without a key"
    assert "--console ordermill-console" in (ROOT / "docker-compose.prod.yml").read_text()
