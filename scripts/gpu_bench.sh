#!/usr/bin/env bash
# One prepared measurement of flashvl_jax on an accelerator (docs/benchmarks.md, "GPU"): bf16 parity against
# PyTorch on the device, the generation bench (JAX vs transformers, same weights, same device) for the static and
# ISS presets with decode at batch 1/8/32, the compile benchmark, the server at 1/16/64 concurrent clients, and a
# few stage-2 train steps with tokens/s and MFU. Every number is printed and written under OUT (default ./gpu_bench_out).
#
#   bash scripts/gpu_bench.sh            # full size (about 8 minutes on an H100 / H200)
#   bash scripts/gpu_bench.sh --tiny     # tiny presets, any host (the test suite runs this on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

size=full; steps=6; batch=8; length=1024; preset=flashvl-2b-static; dtype=bfloat16
bench_flags=(--batch-sizes 1,8,32 --new-tokens 64 --repeats 3)
serve_flags=(--clients 1,16,64 --max-batch 64 --max-seq-len 2048 --new-tokens 64)
if [[ "${1:-}" == "--tiny" ]]; then
  size=tiny; steps=2; batch=2; length=128; preset=tiny-static; dtype=float32
  bench_flags=(--batch-sizes 1,2 --new-tokens 8 --repeats 1)
  serve_flags=(--clients 1,4 --requests-per-client 1 --baseline-requests 4 --max-batch 4 --max-seq-len 256 \
               --new-tokens 8)
elif [[ $# -gt 0 ]]; then
  echo "error: unknown argument $1 (use --tiny or nothing)" >&2
  exit 2
fi
out="${OUT:-gpu_bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'EOF' | tee "$out/environment.txt"
import jax, platform
print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()[0].device_kind} x{jax.device_count()}, "
      f"host {platform.node()}")
EOF

echo "== parity (fp32 and bf16 against transformers on this device)"
python -m flashvl_jax.parity | tee "$out/parity.txt"

echo "== generation: JAX vs PyTorch, ${size} presets, ${dtype}"
python -m flashvl_jax.bench --size "$size" --variants static,iss --dtype "$dtype" "${bench_flags[@]}" \
    --json "$out/bench.json" | tee "$out/bench.txt"

if [[ "$size" == full ]]; then
  echo "== compile time and host memory (2 layers vs full depth)"
  python -m flashvl_jax.bench --compile --variants static --parts sampler --json "$out/compile.json" \
      | tee "$out/compile.txt"
fi

echo "== serving: the server under concurrent clients vs sequential generate, ${size} static, ${dtype}"
python -m flashvl_jax.bench --serve --size "$size" --variant static --dtype "$dtype" "${serve_flags[@]}" \
    --json "$out/serve.json" | tee "$out/serve.txt"

echo "== stage-2 train steps (${preset}, random weights, synthetic data, ${batch} x ${length} tokens)"
rm -rf "$out/train"
python -m flashvl_jax.train stage2_full "model.preset=$preset" "model.compute_dtype=$dtype" data.source=synthetic \
    data.eval_size=0 "data.max_length=$length" "global_batch_size=$batch" "steps=$steps" \
    checkpoint.every_steps=1000000 eval.every_steps=1000000 metrics.log_every_steps=1 \
    "output_dir=$out/train" 2>&1 | tail -n 5
python - "$out/train/metrics.jsonl" <<'EOF' | tee "$out/train.txt"
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "train/tokens_per_s" in r][1:]  # the first step compiles
tps = statistics.median(r["train/tokens_per_s"] for r in rows)
mfu = [r["train/mfu"] for r in rows if "train/mfu" in r]
print(f"train step: {tps:,.0f} tokens/s" + (f", MFU {statistics.median(mfu):.1%}" if mfu else ", MFU n/a (unknown peak)"))
EOF
echo "results in $out/"
