"""Prefect's profiles and settings files as flowhand's lowest configuration layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowhand.config import load_config
from flowhand.errors import ConfigError
from flowhand.jobs import base_environment
from flowhand.prefect_settings import read_dotenv, read_prefect_settings
from tests import console

PROFILES = """
active = "local"

[profiles.local]
PREFECT_API_URL = "http://127.0.0.1:1111/api"

[profiles.cloud]
PREFECT_API_URL = "https://api.example.invalid/api/accounts/a/workspaces/w"
PREFECT_API_KEY = "pnu_profile_secret"
PREFECT_LOGGING_LEVEL = "DEBUG"
PREFECT_WORKER_QUERY_SECONDS = 7
"""


def home_with_profiles(tmp_path: Path, text: str = PROFILES) -> Path:
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(text)
    return home


def test_active_profile_from_the_file_and_from_prefect_profile(tmp_path: Path) -> None:
    """The file's `active` profile is used; PREFECT_PROFILE picks another; values are typed
    by flowhand's model and name their source."""
    home = home_with_profiles(tmp_path)
    config = load_config(None, environ={"HOME": str(home)})
    assert config.api.url == "http://127.0.0.1:1111/api"
    config = load_config(None, environ={"HOME": str(home), "PREFECT_PROFILE": "cloud"})
    assert config.api.url.startswith("https://api.example.invalid/")
    assert config.api.key is not None
    assert config.api.key.get_secret_value() == "pnu_profile_secret"
    assert config.poll_interval_seconds == 7
    source = config.sources()[("api", "key")]
    assert "PREFECT_API_KEY in profile 'cloud'" in source and "profiles.toml" in source


def test_profiles_path_and_prefect_home(tmp_path: Path) -> None:
    """PREFECT_PROFILES_PATH and $PREFECT_HOME/profiles.toml are where Prefect looks."""
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('active = "x"\n[profiles.x]\nPREFECT_API_URL = "http://127.0.0.1:2/api"\n')
    config = load_config(None, environ={"PREFECT_PROFILES_PATH": str(elsewhere)})
    assert config.api.url == "http://127.0.0.1:2/api"
    prefect_home = tmp_path / "ph"
    prefect_home.mkdir()
    (prefect_home / "profiles.toml").write_text(elsewhere.read_text().replace(":2/", ":3/"))
    config = load_config(None, environ={"PREFECT_HOME": str(prefect_home)})
    assert config.api.url == "http://127.0.0.1:3/api"


def test_unknown_prefect_profile_is_a_configuration_error(tmp_path: Path) -> None:
    """PREFECT_PROFILE naming no profile is an error listing the profiles there."""
    home = home_with_profiles(tmp_path)
    with pytest.raises(ConfigError, match=r"PREFECT_PROFILE='prod': no such profile .*cloud, local"):
        load_config(None, environ={"HOME": str(home), "PREFECT_PROFILE": "prod"})


def test_precedence_profile_files_worker_toml_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lowest first: profile, pyproject [tool.prefect], prefect.toml, .env, worker.toml,
    environment, flags; each later source wins for the keys it sets."""
    home = home_with_profiles(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "pyproject.toml").write_text("[tool.prefect.worker]\nprefetch_seconds = 11\n"
                                         "heartbeat_seconds = 12\nquery_seconds = 13\n")
    (work / "prefect.toml").write_text("[worker]\nheartbeat_seconds = 22\nquery_seconds = 23\n"
                                       "[worker.webserver]\nport = 8123\n")
    (work / ".env").write_text("PREFECT_WORKER_QUERY_SECONDS=33\n")
    (work / "worker.toml").write_text("[healthcheck]\nport = 8124\n")
    monkeypatch.chdir(work)
    environ = {"HOME": str(home), "PREFECT_PROFILE": "cloud"}
    config = load_config(None, environ=environ)
    assert config.prefetch_seconds == 11          # pyproject over profile-less default
    assert config.heartbeat_interval_seconds == 22  # prefect.toml over pyproject
    assert config.poll_interval_seconds == 33     # .env over prefect.toml over profile (7)
    assert config.healthcheck.port == 8124        # worker.toml over prefect.toml
    config = load_config(None, {"poll_interval_seconds": 1.5},
                         environ={**environ, "PREFECT_WORKER_WEBSERVER_PORT": "8125"})
    assert config.healthcheck.port == 8125        # environment over worker.toml
    assert config.poll_interval_seconds == 1.5    # flags over everything
    env = {**environ, "PREFECT_WORKER_QUERY_SECONDS": "4", "FLOWHAND_POLL_INTERVAL_SECONDS": "5"}
    assert load_config(None, environ=env).poll_interval_seconds == 5, "FLOWHAND_ wins"


def test_other_prefect_settings_reach_the_runs_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PREFECT_* settings of the profile and files are passed to runs, below the worker's own
    environment and the API settings flowhand uses."""
    home = home_with_profiles(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefect.toml").write_text("[results]\npersist_by_default = true\n"
                                           "[client]\ncustom_headers = { X-Team = 'a' }\n")
    config = load_config(None, environ={"HOME": str(home), "PREFECT_PROFILE": "cloud"})
    env = base_environment(config, environ={"PREFECT_LOGGING_LEVEL": "WARNING"})
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert json.loads(env["PREFECT_CLIENT_CUSTOM_HEADERS"]) == {"X-Team": "a"}
    assert env["PREFECT_LOGGING_LEVEL"] == "WARNING", "the worker's environment wins"
    assert env["PREFECT_API_KEY"] == "pnu_profile_secret"
    assert env["PREFECT_API_URL"] == config.api.url


def test_dotenv_is_read_as_python_dotenv_reads_it(tmp_path: Path) -> None:
    """export prefixes, quotes, comments and ${VAR} expansion, as python-dotenv does."""
    path = tmp_path / ".env"
    path.write_text("# comment\nexport PREFECT_A=1\nPREFECT_B='two words'\n"
                    'PREFECT_C="x # not a comment"\nPREFECT_D=plain # comment\n'
                    "PREFECT_E=${BASE}/api\n")
    assert read_dotenv(path, {"BASE": "http://h"}) == {
        "PREFECT_A": "1", "PREFECT_B": "two words", "PREFECT_C": "x # not a comment",
        "PREFECT_D": "plain", "PREFECT_E": "http://h/api"}


def test_bad_prefect_files_are_configuration_errors(tmp_path: Path) -> None:
    """Unreadable TOML in profiles.toml or prefect.toml is an error naming the file."""
    home = home_with_profiles(tmp_path, "active = \n")
    with pytest.raises(ConfigError, match=r"profiles\.toml: invalid TOML in Prefect profiles"):
        read_prefect_settings({"HOME": str(home)}, cwd=tmp_path)
    (tmp_path / "prefect.toml").write_text("[api\n")
    with pytest.raises(ConfigError, match=r"prefect\.toml: invalid TOML in Prefect settings"):
        read_prefect_settings({}, cwd=tmp_path)


def test_flowhand_config_shows_sources_and_masks_secrets(tmp_path: Path) -> None:
    """`flowhand config` and `flowhand start --show-config` print each value with its source,
    secrets masked; --json gives the same as data, with null for unset values."""
    home = home_with_profiles(tmp_path)
    env = console.base_env(home, PREFECT_PROFILE="cloud", FLOWHAND_LIMIT="4")
    text = console.run("config", "--pool", "p", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "pnu_profile_secret" not in text.stdout + text.stderr
    lines = {line.split()[0]: line for line in text.stdout.splitlines()}
    assert '"********"' in lines["api.key"] and "profile 'cloud'" in lines["api.key"]
    assert "environment variable FLOWHAND_LIMIT" in lines["limit"]
    assert "command line" in lines["pool"] and "default" in lines["prefetch_seconds"]
    assert text.stderr == ""
    show = console.run("start", "--pool", "p", "--show-config", env=env, cwd=tmp_path)
    assert show.returncode == 0 and show.stdout == text.stdout
    rows = json.loads(console.run("config", "--pool", "p", "--json", env=env,
                                  cwd=tmp_path).stdout)
    by_key = {r["key"]: r for r in rows}
    assert by_key["max_run_seconds"]["value"] is None
    assert by_key["api.key"]["value"] == "********"
    assert by_key["runs' environment: PREFECT_LOGGING_LEVEL"]["value"] == "DEBUG"
    assert by_key["runs' environment: PREFECT_API_KEY"]["value"] == "********"
