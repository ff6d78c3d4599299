#!/bin/sh
# Build the local images the Docker tests use; no registry is needed. Idempotent: an image that
# exists (with the same engine script baked in) is left alone.
#
#   scripts/build-test-images.sh            flowhand-test/busybox:1 only (seconds)
#   scripts/build-test-images.sh --python   also flowhand-test/prefect:3.8.8 (minutes: a
#                                           debootstrapped Debian with prefect from PyPI)
#   scripts/build-test-images.sh --python-base
#                                           also flowhand-test/python-base:bookworm: the same
#                                           Debian with python3 only, a base for the Dockerfile
#
# Needs root (or sudo) for apt-get and debootstrap, and a running Docker engine.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
BUSYBOX_IMAGE=flowhand-test/busybox:1
BASE_IMAGE=flowhand-test/bookworm-python:1
PREFECT_IMAGE=flowhand-test/prefect:3.8.8
# A stand-in for python:3.11-slim, to build the project's Dockerfile without a registry.
PYTHON_BASE_IMAGE=flowhand-test/python-base:bookworm
PREFECT_VERSION=3.8.8
# prefect 3.8.8 breaks with newer fastapi releases; pin what its own test environment uses.
FASTAPI_VERSION=0.150.0
# The Debian archive this machine's apt uses (deb822 sources, else sources.list): no host is
# named here, so the build goes wherever the machine's own configuration points.
apt_mirror() {
    found=""
    for sources in /etc/apt/sources.list.d/*.sources; do  # POSIX sh: a glob, not compgen
        [ -f "$sources" ] || continue
        found=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$sources")
        [ -n "$found" ] && break
    done
    if [ -z "$found" ] && [ -f /etc/apt/sources.list ]; then
        found=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list)
    fi
    printf '%s' "$found"
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

with_python=false
with_python_base=false
for arg in "$@"; do
    case "$arg" in
        --python) with_python=true ;;
        --python-base) with_python_base=true ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

have_image() {
    docker image inspect "$1" >/dev/null 2>&1
}

need_package() {
    # $1: a file the package provides, $2: the package
    if [ ! -e "$1" ]; then
        echo "installing $2"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2"
    fi
}

work=$(mktemp -d)
trap 'as_root rm -rf "$work"' EXIT

build_busybox() {
    engine_sum=$(sha256sum "$REPO/tests/docker_engine.sh" | cut -c1-16)
    if have_image "$BUSYBOX_IMAGE"; then
        current=$(docker image inspect -f '{{ index .Config.Labels "flowhand.test.engine" }}' \
            "$BUSYBOX_IMAGE")
        if [ "$current" = "$engine_sum" ]; then
            echo "$BUSYBOX_IMAGE exists"
            return
        fi
    fi
    # Debian's busybox-static is one static binary: with its applet links it is a whole userland.
    need_package /bin/busybox busybox-static
    root="$work/busybox"
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/usr/local/bin"
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    cp "$REPO/tests/docker_engine.sh" "$root/usr/local/bin/engine"
    chmod 755 "$root/usr/local/bin/engine"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
        >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/usr/local/bin:/bin' \
        -c "LABEL flowhand.test.engine=$engine_sum" \
        -c 'CMD ["/bin/sh"]' \
        - "$BUSYBOX_IMAGE" >/dev/null
    echo "built $BUSYBOX_IMAGE"
}

build_python_base() {
    if have_image "$BASE_IMAGE"; then
        echo "$BASE_IMAGE exists"
        return
    fi
    need_package /usr/sbin/debootstrap debootstrap
    if [ -z "$MIRROR" ]; then
        echo "no Debian archive found in /etc/apt/sources.list*: set DEBIAN_MIRROR" >&2
        exit 2
    fi
    root="$work/bookworm"
    as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR"
    as_root rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
    as_root tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    echo "built $BASE_IMAGE"
}

build_prefect() {
    if have_image "$PREFECT_IMAGE"; then
        echo "$PREFECT_IMAGE exists"
        return
    fi
    build_python_base
    ctx="$work/prefect"
    mkdir -p "$ctx"
    # The host's bundle, so pip works behind the same TLS-inspecting proxy the host trusts.
    cp "$CA_BUNDLE" "$ctx/ca-bundle.crt"
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY ca-bundle.crt /etc/ssl/certs/build-ca-bundle.crt
RUN python3 -m venv /opt/prefect \\
 && PIP_CERT=/etc/ssl/certs/build-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    /opt/prefect/bin/pip install --no-cache-dir prefect==$PREFECT_VERSION fastapi==$FASTAPI_VERSION \\
 && rm /etc/ssl/certs/build-ca-bundle.crt
ENV PATH=/opt/prefect/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PREFECT_HOME=/tmp/prefect
EOF
    docker build --network host -t "$PREFECT_IMAGE" "$ctx"
    echo "built $PREFECT_IMAGE"
}

build_python_base_image() {
    # The debootstrapped Debian with python3, plus what a build from it needs on this host: the
    # host's CA bundle for pip (PIP_CERT: the host may sit behind a TLS-inspecting proxy) and
    # the PATH an imported image lacks. Then the project's Dockerfile builds with
    #   docker build --network host --build-arg BASE_IMAGE=flowhand-test/python-base:bookworm .
    ca_sum=$(sha256sum "$CA_BUNDLE" | cut -c1-16)
    if have_image "$PYTHON_BASE_IMAGE"; then
        current=$(docker image inspect -f '{{ index .Config.Labels "flowhand.test.ca" }}' \
            "$PYTHON_BASE_IMAGE")
        if [ "$current" = "$ca_sum" ]; then
            echo "$PYTHON_BASE_IMAGE exists"
            return
        fi
    fi
    build_python_base
    ctx="$work/python-base"
    mkdir -p "$ctx"
    cp "$CA_BUNDLE" "$ctx/ca-bundle.crt"
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY ca-bundle.crt /etc/ssl/certs/build-ca-bundle.crt
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/build-ca-bundle.crt \\
    PIP_DISABLE_PIP_VERSION_CHECK=1
LABEL flowhand.test.ca=$ca_sum
EOF
    docker build -q -t "$PYTHON_BASE_IMAGE" "$ctx" >/dev/null
    echo "built $PYTHON_BASE_IMAGE"
}

build_busybox
if [ "$with_python" = true ]; then
    build_prefect
fi
if [ "$with_python_base" = true ]; then
    build_python_base_image
fi
