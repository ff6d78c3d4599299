"""Configuration errors name the source, the key and what was expected; precedence holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from flowhand import __version__
from flowhand.config import load_config
from flowhand.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "worker.toml.example"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return str(path)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    """Unparseable TOML is an error naming the file and the position."""
    path = write(tmp_path, "pool = \n")
    with pytest.raises(ConfigError, match=r"worker\.toml: invalid TOML.*line 1"):
        load_config(path, environ={})


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    """An unknown key is an error naming the file, the key and the allowed keys."""
    path = write(tmp_path, "pool = 'p'\n[api]\nurll = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "worker.toml: unknown key 'api.urll'" in str(info.value)
    assert "url" in str(info.value)


def test_bad_value_names_key_and_expectation(tmp_path: Path) -> None:
    """A value of the wrong type is an error naming the key, the expectation and the input."""
    path = write(tmp_path, "limit = 'many'\n")
    with pytest.raises(ConfigError, match=r"worker\.toml: key 'limit': .*integer.*'many'"):
        load_config(path, environ={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file that was asked for but does not exist is an error."""
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(str(tmp_path / "nope.toml"), environ={})


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    """Environment overrides the file, and command-line flags override both."""
    path = write(tmp_path, "pool = 'file'\nlimit = 1\nname = 'file-name'\n")
    env = {"FLOWHAND_LIMIT": "2", "FLOWHAND_NAME": "env-name",
           "PREFECT_API_URL": "http://127.0.0.1:1/api", "FLOWHAND_API__MAX_RETRIES": "7"}
    config = load_config(path, {"name": "cli-name"}, environ=env)
    assert (config.pool, config.limit, config.name) == ("file", 2, "cli-name")
    assert config.api.url == "http://127.0.0.1:1/api" and config.api.max_retries == 7


def test_unknown_env_variable_is_an_error() -> None:
    """A FLOWHAND_ variable that matches no setting is reported, not ignored."""
    with pytest.raises(ConfigError, match="FLOWHAND_POLL_SECONDS: unknown setting"):
        load_config(None, environ={"FLOWHAND_POLL_SECONDS": "1"})


def test_config_env_var_selects_the_file(tmp_path: Path) -> None:
    """$FLOWHAND_CONFIG names the file when --config is not given."""
    path = write(tmp_path, "pool = 'from-env-file'\n")
    assert load_config(None, environ={"FLOWHAND_CONFIG": path}).pool == "from-env-file"


def test_secrets_are_masked_in_the_model() -> None:
    """API keys never show up in the config's repr (and so in logs)."""
    config = load_config(None, environ={"PREFECT_API_KEY": "pnu_supersecret"})
    assert "supersecret" not in repr(config)
    assert config.api.key is not None
    assert config.api.key.get_secret_value() == "pnu_supersecret"


def test_example_file_is_valid_and_complete() -> None:
    """worker.toml.example parses and documents every key of the model."""
    config = load_config(str(EXAMPLE), environ={})
    text = EXAMPLE.read_text()
    sections = {k for k, v in type(config).model_fields.items()
                if isinstance(v.annotation, type) and issubclass(v.annotation, BaseModel)}
    for section in [None, *sorted(sections)]:
        model = config if section is None else getattr(config, section)
        if section is not None:
            assert f"[{section}]" in text, section
        for key in type(model).model_fields:
            if section is None and key in sections:
                continue
            assert f"{key} =" in text or f"# {key} =" in text, (section, key)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """`flowhand start` with a bad config exits 2 with a one-line reason."""
    path = write(tmp_path, "pool = 'p'\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "flowhand", "start", "--config", path],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "unknown key 'bogus'" in result.stderr


def test_cli_version() -> None:
    """`flowhand --version` prints the version."""
    result = subprocess.run([sys.executable, "-m", "flowhand", "--version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and __version__ in result.stdout


def test_unreachable_api_with_run_once_exits_1_with_the_reason(tmp_path: Path) -> None:
    """`--run-once` against an API nobody listens on fails fast with exit 1, naming the URL."""
    from tests.prefect_env import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    result = subprocess.run(
        [sys.executable, "-m", "flowhand", "start", "--pool", "p", "--run-once"],
        env={"PATH": "/usr/bin:/bin", "PREFECT_API_URL": url, "FLOWHAND_API__MAX_RETRIES": "1",
             "FLOWHAND_STATE_DIR": str(tmp_path), "FLOWHAND_LOGGING__FORMAT": "json"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "worker.api_unreachable" in result.stderr and url in result.stderr
    assert "ConnectError" in result.stderr
