#!/usr/bin/env bash
# vLLM's own EPLB policy tests against elastic_ep's policy.
#
# Installs vLLM 0.33.0 into a throwaway venv (the wheel without its GPU stack: torch 2.13.0 CPU and
# the few packages that `vllm.distributed.eplb` and `vllm.platforms` import), takes
# tests/distributed/test_eplb_algo.py from vLLM's sdist (nothing of vLLM is committed here), and
# runs it twice:
#   1. as shipped, against vLLM's DefaultEplbPolicy;
#   2. with examples/vllm_plugin installed, loaded through vLLM's own plugin loader
#      (`vllm.plugins.load_general_plugins`, the `vllm.general_plugins` entry point), the test
#      module's `DefaultEplbPolicy` then bound to `EPLB_POLICIES["default"]`, i.e. our policy.
# docs/planner.md says why the one test that still differs does so by design.
#
# Usage: bash benchmarks/vllm_suite.sh [WORKDIR]
#   WORKDIR holds the venv and the downloads (default: a temporary folder, removed at exit).
#   Needs PyPI. About 2 minutes on a 2-core VM, most of it pip.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ge 1 ]; then
    work=$1
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
version=0.33.0
venv=$work/venv
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 numpy pytest
wheel=$(ls "$repo"/.carry/wheels/vllm-$version-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    "$venv/bin/python" -m pip download --quiet --no-deps -d "$work" vllm==$version
    wheel=$(ls "$work"/vllm-$version-*.whl | head -n 1)
fi
"${pip[@]}" --no-deps "$wheel"
# What `import vllm.distributed.eplb.eplb_state` and `vllm.platforms` need on a CPU machine.
"${pip[@]}" cachetools psutil pyzmq urllib3 regex pydantic cbor2 'transformers>=5.16.1,<5.21.0' aiohttp \
    requests openai-harmony openai pillow pybase64

# The sdist's test file. `pip download` of the sdist would build its metadata (CUDA, cmake), so
# the file is taken from the package index's own listing.
sdist=$work/vllm-$version.tar.gz
if [ ! -f "$sdist" ]; then
    "$venv/bin/python" - "$sdist" <<EOF
import re, sys, urllib.request
listing = urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=60).read().decode()
url = next(u for u in re.findall(r'href="([^"#]+)', listing) if u.endswith("vllm-$version.tar.gz"))
urllib.request.urlretrieve(url.replace("&amp;", "&"), sys.argv[1])
EOF
fi
suite=$work/suite
mkdir -p "$suite"
tar -xzf "$sdist" -C "$suite" --strip-components=3 "vllm-$version/tests/distributed/test_eplb_algo.py"

"${pip[@]}" --no-deps --no-build-isolation -e "$repo" "$repo/examples/vllm_plugin"
cat >"$suite/conftest.py" <<'EOF'
"""With ELASTIC_EP_SUITE=ours, vLLM's plugin loader registers our policy and the tests use it."""
import os

if os.environ.get("ELASTIC_EP_SUITE") == "ours":
    import vllm.plugins
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    vllm.plugins.load_general_plugins()
    import test_eplb_algo

    policy = EPLB_POLICIES["default"]
    assert policy.__module__ == "elastic_ep.adapters.vllm", policy
    test_eplb_algo.DefaultEplbPolicy = policy
EOF
cd "$suite"
status=0
for which in vllm ours; do
    echo "== test_eplb_algo.py (vLLM $version) with policy: $which"
    ELASTIC_EP_SUITE=$which "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        test_eplb_algo.py || status=1
done
exit $status
