"""The Dockerfile and compose.yaml, checked without a container engine: the facts the image promises
(entrypoint, command, user, volume, health check) and that the paths and environment it sets load
with ``load_settings`` when mapped onto a temporary directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connector.daemon.http import HealthServer
from connector.daemon.metrics import Metrics
from connector.settings import HttpSettings, load_settings
from connector.state import open_store

REPO = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((REPO / "Dockerfile").read_text(encoding="utf-8"))


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def one(steps: list[tuple[str, str]], keyword: str) -> str:
    found = [a for k, a in steps if k == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_dockerfile_is_multi_stage_slim_non_root_with_volume_entrypoint_and_cmd(
    dockerfile: list[tuple[str, str]],
) -> None:
    froms = [a for k, a in dockerfile if k == "FROM"]
    assert len(froms) >= 2 and all("-slim" in f for f in froms)
    stage = final_stage(dockerfile)
    user = one(stage, "USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    assert "/var/lib/cosell" in json.loads(one(stage, "VOLUME"))
    assert json.loads(one(stage, "ENTRYPOINT")) == ["cosell"]
    assert json.loads(one(stage, "CMD")) == ["run"]
    assert one(stage, "EXPOSE") == str(HttpSettings().port)
    env = env_of(stage)
    assert env["COSELL_CONFIG"] == "/etc/cosell/cosell.yaml"
    assert env["COSELL_DATA_DIR"] == "/var/lib/cosell"
    # the USER line comes after every RUN that needs root
    assert [k for k, _ in stage].index("USER") > max(i for i, (k, _) in enumerate(stage) if k == "RUN")


def healthcheck_command(dockerfile: list[tuple[str, str]]) -> list[str]:
    args = one(final_stage(dockerfile), "HEALTHCHECK")
    _, _, command = args.partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def test_healthcheck_asks_healthz_with_python_and_fails_when_nothing_answers(
    dockerfile: list[tuple[str, str]], tmp_path: Path
) -> None:
    argv = healthcheck_command(dockerfile)
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2] and "curl" not in " ".join(argv)
    # run the check's own code against a live server, then against a port nobody listens on
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with HealthServer(
            "127.0.0.1", 0, store=store, metrics=Metrics(process=False), connections=[]
        ) as server:
            env = {"COSELL_HTTP__PORT": str(server.port)}
            ok = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30)
            port = server.port
    finally:
        store.close()
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        [sys.executable, "-c", argv[2]], env={"COSELL_HTTP__PORT": str(port)}, capture_output=True, timeout=30
    )
    assert down.returncode != 0


def test_the_images_config_paths_load_outside_a_container(
    dockerfile: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc/cosell and /var/lib/cosell mapped onto a temporary directory; the image's ENV as given."""
    root = tmp_path / "image"

    def mapped(value: str) -> str:
        return value.replace("/etc/cosell", str(root / "etc/cosell")).replace(
            "/var/lib/cosell", str(root / "var/lib/cosell")
        )

    example = (REPO / "config/example.yaml").read_text(encoding="utf-8")
    (root / "etc/cosell").mkdir(parents=True)
    (root / "etc/cosell/cosell.yaml").write_text(mapped(example), encoding="utf-8")
    for name, value in env_of(final_stage(dockerfile)).items():
        monkeypatch.setenv(name, mapped(value))
    settings = load_settings(None)  # from $COSELL_CONFIG, as `cosell run` in the image does
    assert settings.config_file == root / "etc/cosell/cosell.yaml"
    assert settings.data_dir == root / "var/lib/cosell"
    assert settings.state_url == f"sqlite:///{root / 'var/lib/cosell/state.db'}"
    assert settings.log.format == "json"
    assert settings.http.port == HttpSettings().port
    assert settings.connections  # the example's connections, mappings resolvable by builtin: name


def test_compose_runs_the_daemon_on_postgresql_with_secrets_outside_the_config(
    dockerfile: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    app, db = compose["services"]["cosell"], compose["services"]["postgres"]
    assert app.get("command", ["run"]) == ["run"]
    assert "./config:/etc/cosell:ro" in app["volumes"]
    assert any(v.endswith(":/var/lib/cosell") for v in app["volumes"])
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert db["image"].startswith("postgres:") and "healthcheck" in db
    assert db["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in db["environment"])
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    # the environment compose gives the daemon loads, with the password interpolated from .env
    env = {
        k: re.sub(r"\$\{COSELL_DB_PASSWORD[^}]*\}", "LettersAndDigitsOnly42", v)
        for k, v in app["environment"].items()
    }
    config = tmp_path / "cosell.yaml"
    config.write_text((REPO / "config/example.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("COSELL_CONFIG", str(config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(None)
    assert settings.state_url == "postgresql+psycopg://cosell:LettersAndDigitsOnly42@postgres:5432/cosell"
    port = app["ports"][0].rsplit(":", 1)[-1]
    assert port == one(final_stage(dockerfile), "EXPOSE")
