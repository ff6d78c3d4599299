#!/bin/sh
# A stand-in for `prefect flow-run execute` inside the busybox test image (tests/engine.py's
# sibling): it reports states through the Prefect API with busybox wget, as the real engine would,
# using only the environment the worker gave the container.
#
#   engine [--state COMPLETED|FAILED|none] [--exit N] [--sleep S] [--print TEXT]
set -u

state=COMPLETED
code=0
pause=0
text=""
while [ $# -gt 0 ]; do
    case "$1" in
        --state) state=$2; shift 2 ;;
        --exit) code=$2; shift 2 ;;
        --sleep) pause=$2; shift 2 ;;
        --print) text=$2; shift 2 ;;
        *) echo "engine: unknown argument $1" >&2; exit 2 ;;
    esac
done

set_state() {
    body="{\"state\": {\"type\": \"$1\"}, \"force\": false}"
    attempt=0
    # SQLite under load answers 503 now and then; the real client retries too.
    while [ $attempt -lt 30 ]; do
        if wget -q -O /dev/null --header "Content-Type: application/json" \
            --post-data "$body" "$PREFECT_API_URL/flow_runs/$PREFECT__FLOW_RUN_ID/set_state"; then
            return 0
        fi
        attempt=$((attempt + 1))
        sleep 0.3
    done
    echo "engine: could not set state $1" >&2
    exit 90
}

[ -n "$text" ] && echo "$text"
set_state RUNNING
[ "$pause" != 0 ] && sleep "$pause"
[ "$state" != none ] && set_state "$state"
exit "$code"
