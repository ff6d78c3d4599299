"""Finding the Prefect installation that runs a flow, as Prefect's process worker would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from flowhand.backends.process.engine_command import (
    EngineResolver,
    PrefectInstall,
    interpreter_of_script,
    prepare_workspace,
    wants_workspace,
)
from flowhand.errors import LaunchFailed
from tests.prefect_env import PREFECT_ENV, skip_or_fail


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bin" / "prefect"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_interpreter_from_each_shebang_form(tmp_path: Path) -> None:
    """The interpreter is read from `#!/abs/python`, pip's `#!/bin/sh` + `'''exec'` form for long
    paths, and `#!/usr/bin/env python3`; else the python beside the script."""
    assert interpreter_of_script(script(tmp_path, "#!/opt/p/bin/python3.11\n"), None) == \
        "/opt/p/bin/python3.11"
    long_form = "#!/bin/sh\n'''exec' /very/long/bin/python \"$0\" \"$@\"\n' '''\n"
    assert interpreter_of_script(script(tmp_path, long_form), None) == "/very/long/bin/python"
    env_form = script(tmp_path, "#!/usr/bin/env python3\n")
    assert interpreter_of_script(env_form, os.path.dirname(sys.executable)) == \
        os.path.join(os.path.dirname(sys.executable), "python3")
    binary = script(tmp_path, "\x7fELF...")
    assert interpreter_of_script(binary, None) is None
    (binary.parent / "python").write_text("")
    assert interpreter_of_script(binary, None) == str(binary.parent / "python")


def test_real_prefect_on_path_is_found_and_probed(tmp_path: Path) -> None:
    """The `prefect` of the test tool environment resolves to its Python, package and version;
    a PATH without one, or a Python without Prefect, is a LaunchFailed saying what to do."""
    if not (PREFECT_ENV / "bin" / "prefect").exists():
        skip_or_fail(f"no Prefect environment at {PREFECT_ENV}")
    resolver = EngineResolver()
    install = anyio.run(resolver.resolve, {"PATH": str(PREFECT_ENV / "bin")})
    assert Path(install.python).parent.resolve() == (PREFECT_ENV / "bin").resolve()
    assert (install.package_dir / "engine.py").is_file()
    assert install.version.startswith("3.")
    assert install.engine_argv() == [install.python, "-m", "prefect.engine"]
    assert install.hook_bootstrap is not None

    with pytest.raises(LaunchFailed, match="`prefect` is not on the run's PATH"):
        anyio.run(resolver.resolve, {"PATH": str(tmp_path)})
    with pytest.raises(LaunchFailed, match=f"Prefect is not installed for {sys.executable}"):
        anyio.run(EngineResolver(sys.executable).resolve, {"PATH": str(tmp_path)})


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("1", True), ("YES", True), ("on", True),
    ("false", False), ("0", False), ("", False), ("maybe", False),
])
def test_auto_install_setting_selects_the_workspace_supervisor(
    tmp_path: Path, value: str, expected: bool
) -> None:
    """PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES is read as Prefect reads a bool; the supervisor
    is used only when the installation has it."""
    package = tmp_path / "prefect"
    (package / "runner").mkdir(parents=True)
    install = PrefectInstall(python="/p/python", package_dir=package, version="3.8.8")
    env = {"PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": value}
    assert not wants_workspace(env, install)
    (package / "runner" / "_workspace_supervisor.py").write_text("")
    assert wants_workspace(env, install) is expected

    attempt = prepare_workspace(install, "run-id", str(tmp_path))
    assert attempt.argv[:3] == ["/p/python", "-m", "prefect.runner._workspace_supervisor"]
    assert oct(os.stat(attempt.directory).st_mode & 0o777) == "0o700"
    assert attempt.manifest() is None
