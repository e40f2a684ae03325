"""Configuration coercion and the personal-data reducers."""

from __future__ import annotations

import pytest

from app.privacy import mask_email, truncate_ip
from config import Config, ConfigError


def make(**environ: str) -> Config:
    return Config(environ, instance_path="/srv/instance")


def test_development_defaults_are_embedded() -> None:
    config = make()

    assert config.SQLALCHEMY_DATABASE_URI == "sqlite:////srv/instance/sessions.sqlite3"
    assert config.CORS_ORIGINS == ["http://localhost:3000", "http://127.0.0.1:3000"]
    assert config.SESSION_RATE_LIMIT == "10/minute"
    assert config.RATELIMIT_STORAGE_URI == "memory://"
    assert config.TRUSTED_PROXY_COUNT == 0
    assert len(config.SECRET_KEY) >= 32


PRODUCTION = {
    "APP_ENV": "production",
    "SECRET_KEY": "s",
    "DATABASE_URL": "postgresql://db/app",
    "MAIL_BACKEND": "smtp",
    "SMTP_HOST": "smtp.example.org",
}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"MAIL_BACKEND": "console"}, "MAIL_BACKEND"),
        ({"SMTP_HOST": ""}, "SMTP_HOST"),
    ],
)
def test_production_refuses_insecure_defaults(override: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make(**{**PRODUCTION, **override})


def test_production_starts_with_its_settings_given() -> None:
    assert make(**PRODUCTION).APP_ENV == "production"


@pytest.mark.parametrize(
    "environ",
    [
        {"TRUSTED_PROXY_COUNT": "one"},
        {"TRUSTED_PROXY_COUNT": "-1"},
        {"APP_ENV": "staging"},
        {"MAX_JSON_BODY_KB": "0"},
        {"SESSION_RATE_LIMIT": "ten a minute"},
        {"UPLOAD_RATE_LIMIT": "30/fortnight"},
    ],
)
def test_malformed_values_are_refused_by_name(environ: dict[str, str]) -> None:
    [name] = environ
    with pytest.raises(ConfigError, match=name):
        make(**environ)


def test_values_are_coerced() -> None:
    config = make(
        TRUSTED_PROXY_COUNT=" 2 ",
        CORS_ORIGINS="https://a.example, https://b.example,",
        DATABASE_URL="postgres://u@h/db",
        MAX_JSON_BODY_KB="8",
    )

    assert config.TRUSTED_PROXY_COUNT == 2
    assert config.CORS_ORIGINS == ["https://a.example", "https://b.example"]
    assert config.SQLALCHEMY_DATABASE_URI == "postgresql://u@h/db"
    assert config.MAX_CONTENT_LENGTH == 8 * 1024
    assert (
        config.SQLALCHEMY_ENGINE_OPTIONS["connect_args"]["options"] == "-c statement_timeout=5000"
    )


@pytest.mark.parametrize(
    ("address", "kept"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::"),
        ("::ffff:198.51.100.9", "198.51.100.0"),
        ("not an ip", None),
        (None, None),
    ],
)
def test_truncate_ip_keeps_only_the_network(address: str | None, kept: str | None) -> None:
    assert truncate_ip(address) == kept


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("jane.doe@example.com", "j***@e***.com"),
        ("a@localhost", "a***@l***"),
        (None, None),
    ],
)
def test_mask_email(email: str | None, masked: str | None) -> None:
    assert mask_email(email) == masked
