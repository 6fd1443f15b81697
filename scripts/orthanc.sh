#!/usr/bin/env bash
# Orthanc (with its DICOMweb plugin) for tests and demos, isolated in its own network namespace.
#
#   scripts/orthanc.sh install              apt-get orthanc, orthanc-dicomweb, dicom3tools (if missing)
#   scripts/orthanc.sh start RUN_DIR [PORT] generate RUN_DIR/orthanc.json, start Orthanc, wait until up
#   scripts/orthanc.sh exec  RUN_DIR CMD... run CMD inside Orthanc's namespace (it sees 127.0.0.1:PORT)
#   scripts/orthanc.sh stop  RUN_DIR        stop it (the storage in RUN_DIR stays)
#
# Orthanc 1.10 cannot bind to loopback only; inside `unshare --net` its loopback is the only
# interface, so nothing outside the namespace reaches it. Needs root (CI runs as root).
set -euo pipefail

cmd=${1:-}
case "$cmd" in
install)
    missing=()
    command -v Orthanc >/dev/null || missing+=(orthanc)
    [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    ;;
start)
    run_dir=$(realpath -m "${2:?RUN_DIR}")
    port=${3:-8042}
    mkdir -p "$run_dir/db"
    plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
    cat >"$run_dir/orthanc.json" <<JSON
{
  "Name": "medseg-test-orthanc",
  "StorageDirectory": "$run_dir/db",
  "IndexDirectory": "$run_dir/db",
  "HttpPort": $port,
  "DicomPort": $((port + 1)),
  "RemoteAccessAllowed": true,
  "AuthenticationEnabled": false,
  "HttpTimeout": 60,
  "StableAge": 2,
  "Plugins": ["$plugin"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "Host": "127.0.0.1:$port", "Ssl": false}
}
JSON
    rm -f "$run_dir/ns.pid"
    # The child writes its pid (the namespace's anchor for nsenter) and becomes Orthanc.
    setsid unshare --net --fork -- sh -c \
        "ip link set lo up && echo \$\$ > '$run_dir/ns.pid' && exec Orthanc '$run_dir/orthanc.json'" \
        >"$run_dir/orthanc.log" 2>&1 </dev/null &
    for _ in $(seq 1 100); do
        if [ -s "$run_dir/ns.pid" ] &&
            nsenter --net="/proc/$(cat "$run_dir/ns.pid")/ns/net" -- \
                curl -sf "http://127.0.0.1:$port/system" >/dev/null 2>&1; then
            echo "Orthanc up: pid $(cat "$run_dir/ns.pid"), http://127.0.0.1:$port/dicom-web (inside its namespace)"
            exit 0
        fi
        sleep 0.2
    done
    echo "Orthanc did not start; see $run_dir/orthanc.log" >&2
    tail -5 "$run_dir/orthanc.log" >&2 || true
    exit 1
    ;;
exec)
    run_dir=${2:?RUN_DIR}
    shift 2
    exec nsenter --net="/proc/$(cat "$run_dir/ns.pid")/ns/net" -- "$@"
    ;;
stop)
    run_dir=${2:?RUN_DIR}
    if [ -s "$run_dir/ns.pid" ]; then
        pid=$(cat "$run_dir/ns.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$run_dir/ns.pid"
    fi
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
