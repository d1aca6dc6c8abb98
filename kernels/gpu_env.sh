# Source on the GPU machine (bare image: torch, Triton, transformers; no network) from the repository
# root to import `odyssey` without installing it: carried wheels (.whl: orjson, pydantic), mamba-ssm's
# prebuilt sm_90 scan (.mamba_src, see kernels/NOTES.md) and a shim package that maps the repository's
# folders into the `odyssey` namespace as setup.py does. Then e.g.
#   python3 -P benchmarks/pretrain_gpu.py --out $OUT
#   python3 -P -m odyssey.kernels.bench --mamba-src $MAMBA_SRC --out $OUT
REPO=$(pwd)
MAMBA_SRC=$REPO/.mamba_src/mamba_ssm-2.3.2.post1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# the extension gzipped (37 MB), whole or in parts of < 16 MiB (the most one file from $OUT may be):
#   in the call that builds it: gzip -c $so | split -b 15M -d - $OUT/selective_scan_cuda.so.gz.part
PREBUILT=.mamba_src/prebuilt/selective_scan_cuda.so.gz
if [ -f "$PREBUILT" ]; then
  gunzip -c "$PREBUILT" > "$MAMBA_SRC/selective_scan_cuda.cpython-312-x86_64-linux-gnu.so"
elif compgen -G "$PREBUILT.part*" > /dev/null; then
  cat "$PREBUILT".part* | gunzip -c > "$MAMBA_SRC/selective_scan_cuda.cpython-312-x86_64-linux-gnu.so"
fi
mkdir -p /tmp/shim/odyssey
touch /tmp/shim/odyssey/__init__.py
for part in models io.py config.py; do ln -sfn "$REPO/odyssey/$part" "/tmp/shim/odyssey/$part"; done
ln -sfn "$REPO/kernels" /tmp/shim/odyssey/kernels
export PYTHONPATH=/tmp/shim:/tmp/site:$MAMBA_SRC PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MAMBA_SRC
