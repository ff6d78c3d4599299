# Sourced by scripts/test and scripts/demo: installs what they need on a fresh machine, idempotently.
#   .venv            flowhand itself (editable) with its test tools
#   .tools/prefect   prefect==3.8.8 in an environment of its own (flowhand never imports it);
#                    $FLOWHAND_PREFECT_ENV instead when set (then nothing is installed there)
#   .tools/prefect-3.9.1  prefect==3.9.1, the other Prefect release the real-flow suite runs
#                    against; $FLOWHAND_PREFECT_391_ENV instead when set
#   Docker engine    Debian's docker.io, dockerd started in the background when not running
#   PostgreSQL       Debian's postgresql (server binaries; each test cluster is private)
#   Kubernetes       scripts/kube-test-cluster up: a control plane on loopback, built with Go
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PREFECT_SPEC=(prefect==3.8.8 fastapi==0.150.0)  # newer FastAPI breaks the 3.8.8 server
PREFECT_391_SPEC=(prefect==3.9.1 fastapi==0.150.0)

pip_quiet() {  # pip without the noise of unreachable extra index locations
  "$@" 2> >(grep -v '^WARNING: Location' >&2)
}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

stamp_ok() {  # stamp_ok DIR CONTENT: true when DIR/.stamp holds CONTENT
  [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]
}

ensure_python_envs() {  # flowhand's .venv and both Prefect tool environments (the tests)
  ensure_flowhand_env
  ensure_prefect_env
  if [ -z "${FLOWHAND_PREFECT_391_ENV:-}" ]; then
    ensure_tool_env "$REPO/.tools/prefect-3.9.1" "${PREFECT_391_SPEC[@]}"
  fi
}

ensure_prefect_env() {  # Prefect 3.8.8 only: all the demo uses
  if [ -z "${FLOWHAND_PREFECT_ENV:-}" ]; then
    ensure_tool_env "$REPO/.tools/prefect" "${PREFECT_SPEC[@]}"
  fi
}

ensure_flowhand_env() {
  local want
  want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
  if ! stamp_ok "$REPO/.venv" "$want"; then
    say "installing flowhand into .venv"
    "$PYTHON" -m venv "$REPO/.venv"
    pip_quiet "$REPO/.venv/bin/pip" install -q --upgrade pip
    pip_quiet "$REPO/.venv/bin/pip" install -q -e "$REPO[test]"
    echo "$want" > "$REPO/.venv/.stamp"
  fi
}

ensure_tool_env() {  # ensure_tool_env DIR SPEC...: a venv at DIR with exactly SPEC installed
  local dir="$1"; shift
  local want="$*"
  if stamp_ok "$dir" "$want"; then return; fi
  say "installing $want into ${dir#"$REPO"/} (a separate tool environment)"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  pip_quiet "$dir/bin/pip" install -q --upgrade pip
  pip_quiet "$dir/bin/pip" install -q "$@"
  echo "$want" > "$dir/.stamp"
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "need root to install $*: install them, or run as root" >&2; return 1
  fi
  if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq; _APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {  # Debian's PostgreSQL server binaries: the fleet tests and the bench use them
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then return; fi
  say "installing Debian's postgresql"
  apt_install postgresql
}

ensure_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  if ! command -v dockerd >/dev/null 2>&1; then
    say "installing Debian's docker.io"
    apt_install docker.io
  fi
  if ! docker info >/dev/null 2>&1; then
    say "starting dockerd in the background (log: .tools/dockerd.log)"
    mkdir -p "$REPO/.tools"
    nohup dockerd >"$REPO/.tools/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && return
      sleep 1
    done
    echo "dockerd did not start; see .tools/dockerd.log" >&2
    tail -20 "$REPO/.tools/dockerd.log" >&2
    return 1
  fi
}

ensure_kube_cluster() {  # the Kubernetes test cluster (scripts/kube-test-cluster), built with Go
  if ! command -v go >/dev/null 2>&1; then
    say "no Go on this machine: the Kubernetes tests skip (and fail under CI)"
    return 0
  fi
  say "Kubernetes test cluster (the first time builds it from Go modules: about 20-30 min)"
  # The tests' session fixture finds it running (KUBECONFIG is theirs to pass, not exported).
  if ! "$REPO/scripts/kube-test-cluster" up >/dev/null; then
    say "scripts/kube-test-cluster up failed: the Kubernetes tests will say why"
  fi
}
