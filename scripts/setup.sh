#!/usr/bin/env bash
# Set up dicomnode in ./.venv on a Debian machine with Python 3.11.
#   scripts/setup.sh          the node
#   scripts/setup.sh --test   the node, the test tools, and the DICOM peers the tests talk to
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--test" ]]; then
  # Real peers for the tests: DCMTK (storescu/storescp/echoscu, dcmcjpeg...), dicom3tools
  # (dciodvfy judges what the node writes), Orthanc (the PACS), PostgreSQL (the tests start
  # their own server with initdb/pg_ctl; the packaged cluster is not used), chromium and its
  # driver (the console's pages in a real browser), systemd-analyze (deploy/'s units).
  missing=()
  command -v /usr/bin/storescu >/dev/null || missing+=(dcmtk)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)
  command -v Orthanc >/dev/null || missing+=(orthanc)
  command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    || missing+=(postgresql)
  command -v /usr/bin/chromium >/dev/null || missing+=(chromium)
  command -v /usr/bin/chromedriver >/dev/null || missing+=(chromium-driver)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  if (( ${#missing[@]} )); then
    sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  extras=".[test]"
else
  extras="."
fi

python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
# torch is pinned (2.13.0) in pyproject.toml; installed first so nothing pulls a CUDA build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e "$extras"
