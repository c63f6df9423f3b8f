"""Settings: YAML + environment layering, secrets never in the file, clear errors for bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.errors import ConfigError
from connector.settings import SalesforceCrm, load_settings, read_secret

CONFIG = """\
data_dir: {data_dir}
connections:
  acme:
    crm:
      kind: salesforce
      login_url: https://acme.my.salesforce.com
      auth: {{flow: client_credentials, client_id: abc, client_secret_file: {secret}}}
    partner_center:
      authority: https://login.microsoftonline.com/tenant-1
      auth: {{mode: device_code, client_id: pc-app}}
    mappings: [builtin:salesforce-default.yaml]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    secret = tmp_path / "sf_secret"
    secret.write_text("s3cr3t-from-file\n", encoding="utf-8")
    path = tmp_path / "cosell.yaml"
    path.write_text(CONFIG.format(data_dir=tmp_path / "data", secret=secret), encoding="utf-8")
    return path


def test_loads_yaml_with_defaults(config: Path, tmp_path: Path) -> None:
    s = load_settings(config)
    conn = s.connection("acme")
    assert isinstance(conn.crm, SalesforceCrm)
    assert conn.partner_center.base_url == "https://api.partner.microsoft.com/v1.0"
    assert s.state_url == f"sqlite:///{tmp_path / 'data' / 'state.db'}"
    assert s.config_file == config
    assert (
        read_secret(conn.crm.auth.client_secret, conn.crm.auth.client_secret_file, "client_secret")
        == "s3cr3t-from-file"
    )


def test_config_path_from_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSELL_CONFIG", str(config))
    assert "acme" in load_settings().connections


def test_environment_overrides_nested_keys(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSELL_LOG__FORMAT", "json")
    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__PARTNER_CENTER__BASE_URL", "https://localhost:8443/v1.0")
    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__CRM__AUTH__CLIENT_SECRET", "from-env")
    s = load_settings(config)
    assert s.log.format == "json"
    conn = s.connection("acme")
    assert conn.partner_center.base_url == "https://localhost:8443/v1.0"
    assert conn.crm.auth.client_secret is not None
    assert conn.crm.auth.client_secret.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)  # SecretStr never prints


def test_settings_are_frozen(config: Path) -> None:
    s = load_settings(config)
    with pytest.raises(ValueError, match="frozen"):
        s.log = s.log  # type: ignore[misc]


def test_secret_in_yaml_is_refused_with_the_env_alternative(config: Path) -> None:
    config.write_text(
        config.read_text().replace("client_id: pc-app}", "client_id: pc-app, password: hunter2}")
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert "connections.acme.partner_center.auth.password" in text
    assert "COSELL_CONNECTIONS__ACME__PARTNER_CENTER__AUTH__PASSWORD" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("kind: salesforce", "kind: sap", "connections.acme.crm", "'salesforce', 'dynamics'"),
        ("data_dir:", "dta_dir: x\ndata_dir:", "dta_dir", "unknown key"),
        (
            "login_url:",
            "loginurl: x\n      login_url:",
            "connections.acme.crm.loginurl",
            "valid: kind, login_url",
        ),
        ("tenant-1", "", "connections.acme.partner_center.authority", "authority looks like"),
        ("  acme:", "  Acme:", "connections.Acme", "lower-case letters"),
        (
            "mappings: [builtin:salesforce-default.yaml]",
            "mappings: []",
            "connections.acme.mappings",
            "at least 1",
        ),
        ("flow: client_credentials", "flow: jwt_bearer", "connections.acme.crm.auth", "needs a username"),
    ],
)
def test_bad_keys_name_file_key_and_valid_values(
    config: Path, old: str, new: str, key: str, words: str
) -> None:
    config.write_text(config.read_text().replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert str(config) in text and f"{key}:" in text and words in text


def test_unknown_connection_lists_known_ones(config: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown connection.*acme"):
        load_settings(config).connection("nope")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("log: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of keys"):
        load_settings(bad)


def test_unreadable_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        read_secret(None, tmp_path / "missing", "client_secret")
