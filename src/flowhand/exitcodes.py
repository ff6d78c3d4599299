"""What an infrastructure exit code means, in the words Prefect uses, plus what to do about it."""

from __future__ import annotations

import signal

# (explanation, resolution) by exit code; the wording of the explanations follows Prefect's so
# that users who search for a message find the same answers.
_HINTS: dict[int, tuple[str, str]] = {
    0: ("Process exited cleanly.", ""),
    1: ("Process exited with a general error.", "Check the flow run's logs for the error."),
    2: ("Process exited with a usage error (misused shell builtin or bad arguments).",
        "Check the command and its arguments in the job variables."),
    125: ("Container failed to run (Docker/OCI exit code 125).",
          "Check the image, the container options and the Docker daemon logs."),
    126: ("Command found but not executable (permission denied).",
          "Make the command executable, or fix the command in the job variables."),
    127: ("Command not found.",
          "Install the command in the run's environment or fix `command` in the job variables."),
    137: ("Process was killed, likely due to an out-of-memory (OOM) condition.",
           "Increase the memory available to the run, or reduce its memory use."),
    143: ("Process received SIGTERM via the container runtime. This is the containerized "
          "equivalent of exit code -15.", ""),
    247: ("Process was terminated due to high memory usage.",
           "Increase the memory available to the run, or reduce its memory use."),
    0xC000013A: ("Process was terminated due to a Ctrl+C or Ctrl+Break signal. Typically caused "
                 "by manual cancellation.", ""),
}
_SIGNAL_HINTS: dict[int, str] = {
    signal.SIGKILL: "Typically caused by the operating system terminating the process for "
    "exceeding memory limits, or by manual cancellation.",
    signal.SIGTERM: "Typically caused by graceful shutdown or manual cancellation.",
    signal.SIGSEGV: "The process crashed with a segmentation fault.",
    signal.SIGABRT: "The process aborted itself.",
    signal.SIGINT: "Typically caused by an interrupt (Ctrl+C).",
}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def explain(code: int) -> str:
    """One sentence on what the exit code means."""
    if code in _HINTS:
        return _HINTS[code][0]
    if code < 0:
        sig = -code
        hint = _SIGNAL_HINTS.get(sig, "")
        return f"Process exited due to a {_signal_name(sig)} signal. {hint}".strip()
    if 128 < code < 128 + 65:
        return (f"Process exited with status {code}, which usually means it was killed by "
                f"{_signal_name(code - 128)}.")
    return "Process exited with an unexpected status code."


def resolution(code: int) -> str:
    """What the user can do about it, or ''."""
    return _HINTS.get(code, ("", ""))[1]


def crash_message(code: int, extra: str | None = None) -> str:
    """The CRASHED message for a non-zero exit, in Prefect's form."""
    message = f"Flow run infrastructure exited with non-zero status code {code}. {explain(code)}"
    return f"{message} {extra}" if extra else message
