#!/usr/bin/env bash
# Set up the lent GPU machine (no network) for Odyssey's benchmarks: source it from the repository root.
#   source benchmarks/device_setup.sh
# Installs the wheels carried in the git-ignored folders .whl/ (orjson, pydantic) and .whl_data/ (polars,
# meds, fhir.resources, captum and their needs) into /tmp/site, then the project itself (editable, no deps),
# and puts both on the path. Fetch the wheels here with `pip download` (see /work/.library/device/README.md).
set -e
wheels=$(ls .whl/*.whl .whl_data/*.whl 2>/dev/null || true)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/odyssey-install.log 2>&1 \
    || { cat /tmp/odyssey-install.log; return 1 2>/dev/null || exit 1; }
export TOKENIZERS_PARALLELISM=false
python3 -c "import odyssey, polars, torch; print('odyssey ready:', torch.cuda.get_device_name(0))"
set +e
