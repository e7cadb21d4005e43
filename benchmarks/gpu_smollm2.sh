#!/usr/bin/env bash
# The SmolLM2 benchmarks that need a GPU, side by side on one card within a time budget:
#   1. AST vs one-shot 2:4 (benchmarks/sparse_training.py), evaluated on the full WikiText-2 test stream at 2048;
#   2. the one-shot table at seqlen 2048, full stream, 128 calibration windows (benchmarks/oneshot.py);
#   3. every allocation config in CONFIGS pruned for real with Wanda (`prunesearch realize`), full stream at 2048.
# Each writes into OUT as it goes (logs, one JSON per realized config); a job still running at the budget is stopped.
#
#   [DEVICE=cuda] bash benchmarks/gpu_smollm2.sh MODEL.gguf DATA_DIR CONFIGS OUT [SECONDS=520] [AST_STEPS=400]
set -u -o pipefail
device=${DEVICE:-cuda} model=$1 data=$2 configs=$3 out=$4 budget=${5:-520} steps=${6:-400}
mkdir -p "$out/realized"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }

# Build the float copy once, before the jobs that read it start side by side.
python3 -c "import sys; from prunesearch.models import load_model; m, t, s = load_model(sys.argv[1], sys.argv[2], 'float32'); \
print('loaded', s, sum(p.numel() for p in m.parameters()), 'parameters on', next(m.parameters()).device)" "$model" "$device" \
  2>&1 | tee "$out/load.log" || exit 1

timeout "$(left)" python3 "$here/benchmarks/sparse_training.py" --model "$model" --device "$device" --steps "$steps" \
  --batch-size 8 --lr 2e-4 --seqlen 512 --eval-seqlen 2048 --threads "$OMP_NUM_THREADS" --data-dir "$data" \
  --name ast-smollm2-cuda --out "$out" > "$out/ast.log" 2>&1 &
timeout "$(left)" python3 "$here/benchmarks/oneshot.py" --model "$model" --device "$device" --data-dir "$data" \
  --name oneshot-smollm2-cuda --out "$out" > "$out/oneshot.log" 2>&1 &
(
  for config in "$configs"/*.json; do
    name=$(basename "$config" .json)
    seed=0; case $name in *s1-*) seed=1 ;; esac
    [ "$(left)" -gt 30 ] || break
    timeout "$(left)" python3 -m prunesearch realize --config "$config" --model "$model" --device "$device" \
      --method wanda --seed "$seed" --ppl wikitext2,c4 --data-dir "$data" --out "/tmp/realized/$name" --overwrite \
      > "$out/realized/$name.log" 2>&1
    cp "/tmp/realized/$name/realize_report.json" "$out/realized/$name.json" 2>/dev/null
    rm -rf "/tmp/realized/$name"
  done
) > "$out/realize.log" 2>&1 &
wait
echo "done in $(($(date +%s) - start)) s"
