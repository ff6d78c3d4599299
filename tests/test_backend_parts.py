"""Backend parts that need no daemon and no process: the output pump, the Docker create request,
the Docker error mapping, and backends' settings tables in the configuration."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import ClassVar

import anyio
import pytest
from prometheus_client import generate_latest

from flowhand.backends import _BUILTIN
from flowhand.backends.base import BackendContext, BackendReports, BackendSettings
from flowhand.backends.docker import DockerBackend, DockerSettings
from flowhand.backends.docker.create_body import create_request
from flowhand.backends.docker.errors import flowhand_error
from flowhand.backends.docker.streams import Unreachable, api_error
from flowhand.backends.fake import FakeBackend
from flowhand.backends.output import OutputPump
from flowhand.backends.process.backend import ProcessBackend, ProcessSettings
from flowhand.backends.process.output_file import OutputFile
from flowhand.cli import _overrides, build_parser
from flowhand.config import backend_settings, create_backend, load_config
from flowhand.errors import BackendUnavailable, ConfigError, InfrastructureError, LaunchFailed
from flowhand.metrics import Metrics


def test_pump_copies_whole_lines_to_stdout_and_sink_and_keeps_the_tail(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """The pump copies only whole lines until the end, then the rest; stdout gets the bytes, the
    sink the lines, and the tail is the last non-blank lines, kept in memory."""
    path = tmp_path / "out.log"
    path.write_bytes(b"one\n\ntwo\nthr")
    lines: list[str] = []
    pump = OutputPump(OutputFile(path), stream_output=True, sink=lines.extend, tail_lines=2,
                      min_seconds=0.01, max_seconds=0.02)

    async def main() -> list[str]:
        assert await pump.pump() == len(b"one\n\ntwo\n")
        path.write_bytes(b"one\n\ntwo\nthree\n\xff")
        return await pump.finish()

    tail = anyio.run(main)
    assert lines == ["one", "", "two", "three", "\ufffd"]
    assert tail == ["three", "\ufffd"]
    assert capfd.readouterr().out == "one\n\ntwo\nthree\n\ufffd\n"


def test_pump_reads_the_tail_from_the_source_when_nothing_was_followed(tmp_path: Path) -> None:
    """A pump that forwards nowhere reads nothing while the run lives and asks the source for
    the last lines only when a tail is wanted."""
    path = tmp_path / "out.log"
    path.write_text("a\nb\n\nc\n")
    pump = OutputPump(OutputFile(path), stream_output=False, sink=None, tail_lines=2,
                      min_seconds=0.01, max_seconds=0.02)

    async def main() -> tuple[list[str], list[str]]:
        async with pump.following():
            await anyio.sleep(0.05)
        return await pump.finish(tail=False), await pump.finish()

    assert anyio.run(main) == ([], ["b", "c"])


def test_create_request_splits_arguments_as_docker_py_documents() -> None:
    """Container, host and split arguments land in the Engine API body, proxy variables come
    first, and an unknown argument is a LaunchFailed naming it."""
    request = create_request({
        "image": "busybox", "command": ["true"], "environment": {"A": "1"}, "name": "n",
        "network": "net1", "ports": {"8080/tcp": 9090}, "volumes": ["/src:/dst:ro"],
        "mem_limit": "16m", "working_dir": "/w", "extra_hosts": {"h": "host-gateway"},
    }, "1.45", {"HTTP_PROXY": "http://proxy.invalid:3128"})
    body = request.body
    assert request.name == "n" and request.platform is None
    assert body["Image"] == "busybox" and body["Cmd"] == ["true"] and body["WorkingDir"] == "/w"
    assert body["Env"] == ["HTTP_PROXY=http://proxy.invalid:3128", "A=1"]
    assert body["ExposedPorts"] == {"8080/tcp": {}} and body["Volumes"] == {"/dst": {}}
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"net1": {}}}
    host = body["HostConfig"]
    assert host["NetworkMode"] == "net1" and host["Binds"] == ["/src:/dst:ro"]
    assert host["Memory"] == 16 << 20 and host["ExtraHosts"] == ["h:host-gateway"]
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "", "HostPort": "9090"}]}
    no_proxy = create_request({"image": "x", "use_config_proxy": False}, "1.45",
                              {"HTTP_PROXY": "p"})
    assert no_proxy.body["Env"] is None
    with pytest.raises(LaunchFailed, match="invalid container_create_kwargs.*'no_such_option'"):
        create_request({"image": "x", "no_such_option": 1}, "1.45", {})
    with pytest.raises(LaunchFailed, match="invalid container_create_kwargs"):
        create_request({"image": "x", "ulimits": [{"bogus": 1}]}, "1.45", {})


def test_docker_errors_map_to_flowhand_errors() -> None:
    """An unreachable daemon, a missing image or network, and other answers become the error
    the caller's situation calls for, with the daemon's words."""
    url = "unix:///nope.sock"
    refused = Unreachable("refused")
    no_image = api_error(404, b'{"message": "No such image: x"}')
    no_net = api_error(404, b'{"message": "network n not found"}')

    launch = flowhand_error(refused, "create the container", daemon_url=url)
    assert type(launch) is LaunchFailed and "cannot reach the Docker daemon at " + url in str(launch)
    watch = flowhand_error(refused, "inspect", daemon_url=url, kind=InfrastructureError)
    assert type(watch) is BackendUnavailable
    image = flowhand_error(no_image, "create the container", daemon_url=url, image="x")
    assert "image 'x' is not present on the Docker host (No such image: x)" in str(image)
    pull = flowhand_error(no_image, "pull image 'x'", daemon_url=url, hint="check the name")
    assert str(pull) == "cannot pull image 'x': No such image: x; check the name"
    assert "docker network create" in str(flowhand_error(no_net, "start", daemon_url=url))
    other = flowhand_error(no_net, "ping", daemon_url=url, kind=BackendUnavailable)
    assert type(other) is BackendUnavailable and "network n not found" in str(other)


def test_backend_tables_are_validated_by_their_backends(tmp_path: Path) -> None:
    """[docker] and [process] are checked by the backends' own models, from the file and
    FLOWHAND_<SECTION>__<KEY>, with the same one-line errors as the core's keys."""
    path = tmp_path / "worker.toml"
    path.write_text("[docker]\napi_threads = 4\n[process]\ncrash_log_lines = 5\n")
    config = load_config(str(path), environ={"FLOWHAND_DOCKER__TIMEOUT_SECONDS": "9"})
    docker_settings = backend_settings(DockerBackend, config)
    assert isinstance(docker_settings, DockerSettings)
    assert (docker_settings.api_threads, docker_settings.timeout_seconds) == (4, 9.0)
    process = backend_settings(ProcessBackend, config)
    assert isinstance(process, ProcessSettings) and process.crash_log_lines == 5

    path.write_text("[docker]\napi_thread = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert "worker.toml: unknown key 'docker.api_thread' (allowed here: api_threads" in str(
        info.value)
    with pytest.raises(ConfigError, match=r"FLOWHAND_DOCKER__API_THREADS: key 'docker.api_"
                                          r"threads': .*less than or equal to 64"):
        load_config(None, environ={"FLOWHAND_DOCKER__API_THREADS": "65"})
    with pytest.raises(ConfigError, match="FLOWHAND_DOCKER__NOPE: unknown setting"):
        load_config(None, environ={"FLOWHAND_DOCKER__NOPE": "1"})
    path.write_text("[dockerr]\napi_threads = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'dockerr' \(allowed here: .*docker.*"
                                          r"process"):
        load_config(str(path), environ={})


def test_subprocess_table_is_read_as_process(tmp_path: Path) -> None:
    """A [subprocess] table (the former name) configures the process backend as [process] does,
    its keys reported as process.*; where a file has both, [process] wins."""
    path = tmp_path / "worker.toml"
    path.write_text("[subprocess]\ncrash_log_lines = 5\nkill_grace_seconds = 7\n")
    config = load_config(str(path), environ={})
    settings = backend_settings(ProcessBackend, config)
    assert isinstance(settings, ProcessSettings)
    assert (settings.crash_log_lines, settings.kill_grace_seconds) == (5, 7.0)
    assert config.sources()[("process", "crash_log_lines")] == str(path)
    path.write_text("[subprocess]\ncrash_log_lines = 5\n[process]\ncrash_log_lines = 6\n")
    settings = backend_settings(ProcessBackend, load_config(str(path), environ={}))
    assert isinstance(settings, ProcessSettings) and settings.crash_log_lines == 6
    path.write_text("[subprocess]\ncrash_log_line = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'process.crash_log_line' \(allowed "
                                          r"here: .*crash_log_lines"):
        load_config(str(path), environ={})


def test_subprocess_environment_variables_are_read_as_process() -> None:
    """FLOWHAND_SUBPROCESS__<KEY> still sets the process backend's key; FLOWHAND_PROCESS__<KEY>
    wins over it when both are set, and a bad value names the variable."""
    config = load_config(None, environ={"FLOWHAND_SUBPROCESS__CRASH_LOG_LINES": "3"})
    settings = backend_settings(ProcessBackend, config)
    assert isinstance(settings, ProcessSettings) and settings.crash_log_lines == 3
    assert config.sources()[("process", "crash_log_lines")] == (
        "environment variable FLOWHAND_SUBPROCESS__CRASH_LOG_LINES")
    for environ in ({"FLOWHAND_SUBPROCESS__CRASH_LOG_LINES": "3",
                     "FLOWHAND_PROCESS__CRASH_LOG_LINES": "4"},
                    {"FLOWHAND_PROCESS__CRASH_LOG_LINES": "4",
                     "FLOWHAND_SUBPROCESS__CRASH_LOG_LINES": "3"}):
        settings = backend_settings(ProcessBackend, load_config(None, environ=environ))
        assert isinstance(settings, ProcessSettings) and settings.crash_log_lines == 4
    with pytest.raises(ConfigError, match="FLOWHAND_SUBPROCESS__NOPE: unknown setting"):
        load_config(None, environ={"FLOWHAND_SUBPROCESS__NOPE": "1"})
    with pytest.raises(ConfigError, match="FLOWHAND_SUBPROCESS__CRASH_LOG_LINES: key "
                                          "'process.crash_log_lines'"):
        load_config(None, environ={"FLOWHAND_SUBPROCESS__CRASH_LOG_LINES": "-1"})


def test_subprocess_keys_on_the_command_line_are_read_as_process() -> None:
    """Overrides under `subprocess` (the names `flowhand config` showed) set the process
    backend's keys, over the file's and the environment's [process] values."""
    config = load_config(None, {"subprocess": {"crash_log_lines": 9}},
                         environ={"FLOWHAND_PROCESS__CRASH_LOG_LINES": "4"})
    settings = backend_settings(ProcessBackend, config)
    assert isinstance(settings, ProcessSettings) and settings.crash_log_lines == 9
    assert config.sources()[("process", "crash_log_lines")] == "command line"


class PluginSettings(BackendSettings):
    endpoint: str
    retries: int = 1


class PluginBackend(FakeBackend):
    settings_section: ClassVar[str | None] = "plugin_runner"
    settings_model = PluginSettings


def test_a_registered_backend_brings_its_own_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend registered under another name (as an entry point would register it) gets its
    own table and FLOWHAND_<SECTION>__<KEY> variables, validated by its model."""
    monkeypatch.setitem(_BUILTIN, "plugin", "tests.test_backend_parts:PluginBackend")
    config = load_config(None, {"plugin_runner": {"endpoint": "http://127.0.0.1:1"}},
                         environ={"FLOWHAND_PLUGIN_RUNNER__RETRIES": "3"})
    backend = create_backend(PluginBackend, config)
    assert backend.settings == PluginSettings(endpoint="http://127.0.0.1:1", retries=3)
    with pytest.raises(ConfigError, match="command line: key 'plugin_runner.endpoint': Field "
                                          "required"):
        load_config(None, {"plugin_runner": {"retries": 2}}, environ={})


def test_example_file_documents_every_backend_key() -> None:
    """worker.toml.example has a [process] and a [docker] table naming every key of those
    backends' settings models, and its values pass their validation."""
    example = Path(__file__).parent.parent / "worker.toml.example"
    text = example.read_text()
    config = load_config(str(example), environ={})
    for backend in (ProcessBackend, DockerBackend):
        section = backend.settings_section
        table = text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key in backend.settings_model.model_fields:
            assert f"\n{key} =" in table or f"\n# {key} =" in table, (section, key)
        assert isinstance(backend_settings(backend, config), backend.settings_model)


def test_warm_starts_are_on_by_default_and_the_flags_choose() -> None:
    """With no setting a process backend forks warm; `--no-warm-start`, warm_start = false in
    [process] or [subprocess], or FLOWHAND_PROCESS__WARM_START=false turn it off; `--warm-start`
    stays accepted; the settings carry the effective choice and its reason."""
    parser = build_parser()

    def settings(argv: list[str], environ: dict[str, str]) -> ProcessSettings:
        config = load_config(None, _overrides(parser.parse_args(["config", *argv])),
                             environ=environ)
        backend = create_backend(ProcessBackend, config)
        assert isinstance(backend, ProcessBackend)
        assert (backend.warm is not None) == backend.settings.warm_start
        return backend.settings

    assert settings([], {}).warm_start
    assert settings(["--warm-start"], {"FLOWHAND_PROCESS__WARM_START": "false"}).warm_start
    off = settings(["--no-warm-start"], {})
    assert not off.warm_start and off.warm_start_effective.startswith("off")
    assert not settings([], {"FLOWHAND_PROCESS__WARM_START": "false"}).warm_start
    assert not settings([], {"FLOWHAND_SUBPROCESS__WARM_START": "0"}).warm_start


def test_backend_counts_are_prometheus_metrics() -> None:
    """What a backend counts through its context (warm starts, fallbacks by reason) is exported
    as flowhand_backend_events_total with the worker's labels."""
    events = BackendReports()
    metrics = Metrics("p", "process", events.counts)
    events.count("warm_start_forked")
    events.count("warm_start_fallback", "memory")
    events.count("warm_start_fallback", "memory")
    text = generate_latest(metrics.registry).decode()
    assert ('flowhand_backend_events_total{backend="process",event="warm_start_fallback",'
            'pool="p",reason="memory"} 2.0') in text
    assert ('flowhand_backend_events_total{backend="process",event="warm_start_forked",'
            'pool="p",reason=""} 1.0') in text


def test_backend_context_has_one_channel_to_the_worker() -> None:
    """A backend's counts, dropped-output reports and run notes go through one object."""
    context = BackendContext(Path("/nonexistent"), "w")
    dropped: list[tuple[uuid.UUID, int, str]] = []
    context.reports.on_output_dropped(lambda *report: dropped.append(report))
    notes: list[tuple[uuid.UUID, int, str]] = []
    context.reports.on_run_note(lambda *note: notes.append(note))
    context.reports.count("warm_start_forked")
    run_id = uuid.uuid4()
    context.reports.output_dropped(run_id, 5, "stdout closed")
    context.reports.run_note(run_id, 20, "waiting for a node")
    assert notes == [(run_id, 20, "waiting for a node")]
    assert context.reports.counts() == {("warm_start_forked", ""): 1}
    assert dropped == [(run_id, 5, "stdout closed")]
