#!/usr/bin/env bash
# System packages for the hospital tests (Orthanc + DICOMweb plugin, dciodvfy, headless
# Chromium + chromedriver). Idempotent and quick when present; a no-op without root or apt,
# in which case those tests skip themselves.
set -euo pipefail
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v unshare >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "ci_system_deps: missing ${missing[*]} (not root or no apt-get): their tests will skip" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
