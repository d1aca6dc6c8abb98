#!/usr/bin/env bash
# Same-call pretraining A/B on the GPU machine: this tree against a baseline tree (another commit unpacked beside
# it), in alternating rounds so drift of the card falls on both sides. Source kernels/gpu_env.sh first.
#   git archive BASE_COMMIT | tar -x -C .ab_base          # here; .ab_base is git-ignored, carry it
#   bash benchmarks/ab_pretrain.sh .ab_base $OUT/ab 2 --lengths 2048 16384 --models ehrmamba --steps 20
# Writes OUT/{base,new}_ROUND/pretrain_gpu.json and prints each run's tokens/s.
set -eu
base_tree=$(cd "$1" && pwd)
out=$2
rounds=$3
shift 3
mkdir -p /tmp/shim_base/odyssey "$out"
touch /tmp/shim_base/odyssey/__init__.py
for part in models io.py config.py; do ln -sfn "$base_tree/odyssey/$part" "/tmp/shim_base/odyssey/$part"; done
ln -sfn "$base_tree/kernels" /tmp/shim_base/odyssey/kernels
base_path=/tmp/shim_base:${PYTHONPATH#*:}   # the shim first, then what gpu_env.sh put after its own shim
for round in $(seq 1 "$rounds"); do
    PYTHONPATH=$base_path python3 -u -P "$base_tree/benchmarks/pretrain_gpu.py" --out "$out/base_$round" "$@" \
        > "$out/base_$round.log" 2>&1
    python3 -u -P benchmarks/pretrain_gpu.py --out "$out/new_$round" "$@" > "$out/new_$round.log" 2>&1
    for side in base new; do
        python3 - "$out/${side}_$round/pretrain_gpu.json" "$side" "$round" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
rows = [f"{r['length']}: {r['tokens_per_second']:,.0f} tok/s, {r['peak_memory_bytes'] / 2**30:.2f} GiB"
        for r in report["models"]["ehrmamba"]["by_length"]]
print(sys.argv[2], sys.argv[3], "; ".join(rows))
EOF
    done
done
