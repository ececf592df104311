#!/usr/bin/env bash
# One-step environment setup for ctsparse, safe to re-run (the second run takes seconds).
#
#   bash scripts/setup.sh
#
# Creates .venv (override with CTSPARSE_VENV), installs the system BLAS when missing (Debian/Ubuntu,
# as root or with sudo) and Orthanc with its DICOMweb plugin for the DICOM node's tests, torch
# (CTSPARSE_TORCH, default torch==2.13.0: the CPU build), builds MinkowskiEngine 0.5.4 with the
# project's patch set once per machine (cached wheel under ~/.cache/ctsparse/me-wheels, override
# with CTSPARSE_CACHE), and installs ctsparse in editable mode with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CTSPARSE_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${CTSPARSE_TORCH:-torch==2.13.0}
log() { printf '[setup] %s\n' "$*"; }

"$PY" - <<'PYCHECK' || { echo "[setup] Python >= 3.10 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

# System packages: a BLAS for ME's CPU kernels, `patch` to apply our ME patch set.
need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
# A link test is the real question: can ME be linked against -lopenblas with cblas.h available?
if ! command -v g++ >/dev/null || ! printf '#include <cblas.h>\nint main(){return 0;}\n' \
    | g++ -x c++ - -lopenblas -o /dev/null >/dev/null 2>&1; then
  need_apt+=(libopenblas-dev)
fi
command -v patch >/dev/null || need_apt+=(patch)
# Orthanc and its DICOMweb plugin: the PACS the DICOM node's tests talk to (each test run starts
# its own instance on free loopback ports). Optional: without apt the tests skip, saying why.
want_apt=()
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || want_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || want_apt+=(orthanc-dicomweb)
if [ ${#need_apt[@]} -gt 0 ] || [ ${#want_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    log "installing system packages: ${need_apt[*]} ${want_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" "${want_apt[@]}" >/dev/null
    # The package enables a system Orthanc on 4242/8042 with a database under /var/lib/orthanc;
    # ctsparse needs none of it, so one this script installed is stopped and disabled.
    if [[ " ${want_apt[*]} " == *" orthanc "* ]] && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
    fi
  elif [ ${#need_apt[@]} -gt 0 ]; then
    log "please install: ${need_apt[*]} (a BLAS with cblas.h, patch, a C++ compiler)"; exit 1
  else
    log "Orthanc not installed (no apt-get): the DICOM node tests will be skipped"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# a download cut off half way is retried and resumed rather than failing the whole setup
export PIP_RETRIES="${PIP_RETRIES:-10}" PIP_RESUME_RETRIES="${PIP_RESUME_RETRIES:-10}"
pipq() {
  local out
  if ! out=$("$VPY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$out" | grep -v "^WARNING: Location" >&2; return 1
  fi
}

# torch first (pinned: an unpinned torch pulls a multi-GB CUDA build), then ME is compiled
# against exactly that torch.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC"
fi
pipq --upgrade "pip>=23" setuptools wheel
pipq "$TORCH_SPEC" numpy ninja
"$VPY" -c "import torch" || { log "torch failed to install"; exit 1; }

"$VPY" scripts/install_me.py

log "installing ctsparse (editable) with dev tools"
pipq -e ".[dev]"
"$VPY" -c "import MinkowskiEngine, ctsparse.cli.main" || { log "installation check failed"; exit 1; }
log "done: activate with 'source $VENV/bin/activate', then run 'ctsparse doctor'"
