"""Settings: read once from the environment, failing with a message that names the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from webhook_service.settings import SANDBOX_AUTH_ID, Settings, SettingsError

from .helpers import environ_without_settings, free_port

ROOT = Path(__file__).resolve().parent.parent
PROD = {"PLIVO_AUTH_ID": "MAXXXXXXXXXXXXXXXXXX", "PLIVO_AUTH_TOKEN": "tok", "PUBLIC_BASE_URL": "https://m.example.com",
        "API_TOKENS": "token-aaaa,token-bbbb", "DATABASE_URL": "postgresql://svc@db.example.com/masking"}


def test_without_plivo_credentials_the_service_runs_in_sandbox_mode():
    settings = Settings.from_env({})
    assert settings.sandbox and settings.plivo_auth_id == SANDBOX_AUTH_ID
    assert settings.plivo_api_base_url == "http://127.0.0.1:8001"
    assert settings.database_url is None


def test_production_settings_are_read_and_typed():
    settings = Settings.from_env(PROD | {"PLIVO_AUTH_TOKEN": "new, old", "PLIVO_READ_TIMEOUT": "2.5",
                                         "PUBLIC_BASE_URL": "https://m.example.com/"})
    assert not settings.sandbox
    assert settings.plivo_auth_tokens == ("new", "old") and settings.plivo_auth_token == "new"
    assert settings.api_tokens == ("token-aaaa", "token-bbbb")
    assert settings.plivo_read_timeout == 2.5
    assert settings.session_callback_url == "https://m.example.com/webhooks/plivo/session"
    assert settings.recording_callback_url == "https://m.example.com/webhooks/plivo/recording"
    assert "tok" not in repr(settings) and "token-aaaa" not in repr(settings)


@pytest.mark.parametrize(("change", "variable"), [
    ({"PUBLIC_BASE_URL": ""}, "PUBLIC_BASE_URL"),
    ({"API_TOKENS": ""}, "API_TOKENS"),
    ({"PLIVO_AUTH_TOKEN": ""}, "PLIVO_AUTH_TOKEN"),
    ({"PUBLIC_BASE_URL": "masking.example.com"}, "PUBLIC_BASE_URL"),
    ({"PUBLIC_BASE_URL": "https://m.example.com/?a=b"}, "PUBLIC_BASE_URL"),
    ({"PLIVO_API_BASE_URL": "ftp://x"}, "PLIVO_API_BASE_URL"),
    ({"API_TOKENS": "short"}, "API_TOKENS"),
    ({"PLIVO_AUTH_TOKEN": "a,b,c"}, "PLIVO_AUTH_TOKEN"),
    ({"PLIVO_READ_TIMEOUT": "soon"}, "PLIVO_READ_TIMEOUT"),
    ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
    ({"DATABASE_URL": ""}, "DATABASE_URL"),
    ({"PUBLIC_BASE_URL": "http://m.example.com"}, "PUBLIC_BASE_URL"),
    ({"PUBLIC_BASE_URL_ALLOW_HTTP": "perhaps"}, "PUBLIC_BASE_URL_ALLOW_HTTP"),
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
    ({"LOG_LEVEL": "info,debug"}, "LOG_LEVEL"),
    ({"DEFAULT_PHONE_REGION": "USA"}, "DEFAULT_PHONE_REGION"),
    ({"FORWARDED_ALLOW_IPS": "10.0.0.1,nginx"}, "FORWARDED_ALLOW_IPS"),
])
def test_bad_settings_stop_the_start_naming_the_variable(change, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(PROD | change)


def test_app_factory_refuses_to_start_with_bad_settings(monkeypatch):
    from webhook_service import create_app

    monkeypatch.setenv("PLIVO_AUTH_ID", "MAXXXXXXXXXXXXXXXXXX")
    monkeypatch.setenv("PLIVO_AUTH_TOKEN", "tok")
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:9/none")  # given: the URL is missing alone
    monkeypatch.delenv("PUBLIC_BASE_URL", raising=False)
    with pytest.raises(SettingsError, match="PUBLIC_BASE_URL"):
        create_app()


def test_production_never_falls_back_to_the_embedded_database():
    settings = {k: v for k, v in PROD.items() if k != "DATABASE_URL"}
    with pytest.raises(SettingsError, match="DATABASE_URL is required when PLIVO_AUTH_ID is set"):
        Settings.from_env(settings)
    assert Settings.from_env({}).database_url is None  # sandbox mode: the embedded PostgreSQL


def test_an_http_public_base_url_needs_its_explicit_setting_in_production():
    with pytest.raises(SettingsError, match="PUBLIC_BASE_URL must be an https URL.*PUBLIC_BASE_URL_ALLOW_HTTP"):
        Settings.from_env(PROD | {"PUBLIC_BASE_URL": "http://127.0.0.1:8000"})
    rig = Settings.from_env(PROD | {"PUBLIC_BASE_URL": "http://127.0.0.1:8000", "PUBLIC_BASE_URL_ALLOW_HTTP": "true"})
    assert rig.public_base_url == "http://127.0.0.1:8000" and rig.public_base_url_allow_http
    assert Settings.from_env({}).public_base_url == "http://127.0.0.1:8000"  # sandbox mode needs no setting


def test_log_level_is_read_case_blind_and_defaults_to_info():
    assert Settings.from_env(PROD | {"LOG_LEVEL": "warning"}).log_level == "WARNING"
    assert Settings.from_env(PROD).log_level == "INFO" and not Settings.from_env(PROD).log_level_given
    assert Settings.from_env(PROD | {"LOG_LEVEL": "INFO"}).log_level_given


def test_default_phone_region_is_a_known_region_code():
    assert Settings.from_env(PROD | {"DEFAULT_PHONE_REGION": "us"}).default_phone_region == "US"
    assert Settings.from_env(PROD).default_phone_region is None


def _production_without_database(tmp_path) -> dict[str, str]:
    return environ_without_settings() | {k: v for k, v in PROD.items() if k != "DATABASE_URL"} | {
        "EMBEDDED_PGDATA": str(tmp_path / "pgdata"), "GUNICORN_BIND": f"127.0.0.1:{free_port()}",
        "WEB_CONCURRENCY": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}


@pytest.mark.parametrize("command", [
    ["-m", "gunicorn", "--config", "gunicorn.conf.py", "webhook_service:create_app()"],  # the Procfile's web
    ["-m", "webhook_service.migrate"],  # its release
    ["-m", "flask", "--app", "webhook_service:create_app()", "worker"],  # its worker
], ids=["web", "release", "worker"])
def test_production_processes_refuse_to_start_without_database_url(tmp_path, command):
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=_production_without_database(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DATABASE_URL is required when PLIVO_AUTH_ID is set" in done.stderr, done.stderr
    assert not (tmp_path / "pgdata").exists()  # no embedded PostgreSQL was started


def test_a_production_install_ships_no_fake_plivo():
    """`pip install .` takes the packages pyproject.toml's find rule selects (setuptools' own search,
    run here with that rule): the service's package and not the sandbox Plivo."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    rule = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(where=str(root), include=rule["include"], exclude=rule.get("exclude", ()))
    assert "webhook_service.services" in shipped
    assert not [name for name in shipped if "sandbox" in name], shipped
    assert (root / "plivo_sandbox" / "__main__.py").exists()  # it is in the checkout, for development


def test_the_client_is_read_from_x_forwarded_for_only_through_trusted_proxies():
    from webhook_service.web.clients import TrustedProxies

    proxies = TrustedProxies(Settings.from_env(PROD | {"FORWARDED_ALLOW_IPS": "127.0.0.1, 10.0.0.0/8"})
                             .forwarded_allow_ips)
    # nginx (10.1.1.1) behind the load balancer (127.0.0.1): each appended the address it saw.
    assert proxies.client("127.0.0.1", "203.0.113.9, 198.51.100.4, 10.1.1.1") == "198.51.100.4"
    assert proxies.client("127.0.0.1", "10.1.1.2") == "10.1.1.2"  # every hop trusted: the furthest one
    assert proxies.client("127.0.0.1", "not-an-address, 198.51.100.4") == "198.51.100.4"
    assert proxies.client("127.0.0.1", None) == "127.0.0.1"
    assert proxies.client("192.0.2.8", "198.51.100.4") == "192.0.2.8"  # a stranger's claim is not believed
    assert TrustedProxies("*").client("192.0.2.8", "198.51.100.4") == "198.51.100.4"
