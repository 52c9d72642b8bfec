"""Settings: read once from the environment, failing with a message that names the variable."""

from __future__ import annotations

import pytest

from webhook_service.settings import SANDBOX_AUTH_ID, Settings, SettingsError

PROD = {"PLIVO_AUTH_ID": "MAXXXXXXXXXXXXXXXXXX", "PLIVO_AUTH_TOKEN": "tok", "PUBLIC_BASE_URL": "https://m.example.com",
        "API_TOKENS": "token-aaaa,token-bbbb"}


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
])
def test_bad_settings_stop_the_start_naming_the_variable(change, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(PROD | change)


def test_app_factory_refuses_to_start_with_bad_settings(monkeypatch):
    from webhook_service import create_app

    monkeypatch.setenv("PLIVO_AUTH_ID", "MAXXXXXXXXXXXXXXXXXX")
    monkeypatch.setenv("PLIVO_AUTH_TOKEN", "tok")
    monkeypatch.delenv("PUBLIC_BASE_URL", raising=False)
    with pytest.raises(SettingsError, match="PUBLIC_BASE_URL"):
        create_app()
