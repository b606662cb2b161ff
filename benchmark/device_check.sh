#!/usr/bin/env bash
# The CUDA path proven in one short run: versions and the GPU, the CUDA tests, speed.py on CUDA (eager and
# compiled), a short real fine-tuning on a dataset built here (every tag finite, its checkpoints used by a
# CPU-only process), 1, 4 and 8 runs at once on the one GPU, and GPU utilisation sampled throughout.
# One markdown report and its logs go to the folder given.
#
#   bash benchmark/device_check.sh --download-wheels      # here, with an index: the wheels a bare GPU machine lacks
#   bash benchmark/device_check.sh OUT                    # on the GPU machine (its python3 and CUDA torch), ~6 min
#   bash benchmark/device_check.sh OUT --cpu-rehearsal    # the same steps on the CPU at toy sizes (CI, ~3 min)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.wheels"
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--download-wheels" ]; then  # for the GPU machine's Python 3.12, x86-64; torch it has
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    gymnasium mujoco "minari[hdf5]" tyro
  rm -f "$WHEELS"/numpy-*.whl "$WHEELS"/h5py-*.whl  # the machine's own
  echo "wheels in $WHEELS: $(du -sh "$WHEELS" | cut -f1); carry .wheels to the device machine"
  exit 0
fi

OUT="${1:?usage: bash benchmark/device_check.sh OUT [--cpu-rehearsal] | --download-wheels}"
REHEARSAL=0; [ "${2:-}" = "--cpu-rehearsal" ] && REHEARSAL=1
if [ $REHEARSAL = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "error: CUDA is not available on this machine ($PY's torch sees no GPU): run the check on a GPU machine, or" \
       "rehearse it here with --cpu-rehearsal." >&2
  exit 1
fi
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"; REPORT="$OUT/report.md"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore MUJOCO_GL=egl HF_HUB_OFFLINE=1 MINARI_DATASETS_PATH="$OUT/store"
cd "$ROOT"
if ! "$PY" -c "import gymnasium, mujoco, minari, tyro" 2>/dev/null; then  # a bare GPU machine: the carried wheels
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" gymnasium mujoco minari tyro > "$OUT/install.log" 2>&1 \
    || { echo "error: installing from $WHEELS failed (see $OUT/install.log): run --download-wheels here first" >&2; exit 1; }
fi
if [ $REHEARSAL = 1 ]; then
  DEV=(--no-cuda --threads 1); SPEED=(--scripts baq_iql --no-cuda --seconds 1 --rounds 1 --warmup 2 --offline-size 20000)
  SIZE=(--num-transitions 3000); RUN=(--offline-steps 200 --bc-steps 100 --online-steps 300 --eval-every 150)
  PACK=(1 2); PACK_STEPS=200
else
  DEV=(--cuda); SPEED=(--no-cpu --seconds 8 --rounds 3); SIZE=(--num-transitions 100000)
  RUN=(--offline-steps 5000 --bc-steps 2000 --online-steps 5000 --eval-every 2500); PACK=(1 4 8); PACK_STEPS=3000
fi
section() { printf '\n## %s\n\n' "$1" >> "$REPORT"; echo "== $1 ($(date +%T))"; }
sample_gpu() {  # GPU utilisation and memory every 0.5 s into $OUT/gpu-$1.csv until stop_gpu
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu-$1.csv" &
    SAMPLER=$!
  else SAMPLER=; fi
}
stop_gpu() {  # one line per phase into $OUT/utilisation.md, reported at the end
  { [ -n "$SAMPLER" ] && kill "$SAMPLER" && wait "$SAMPLER"; } 2>/dev/null || true
  if [ -s "$OUT/gpu-$1.csv" ]; then
    awk -F', ' '{u+=$1; if ($2>m) m=$2} END {printf "| %s | %.0f%% | %d | %d MiB |\n", phase, u/NR, NR, m}' \
      phase="$1" "$OUT/gpu-$1.csv" >> "$OUT/utilisation.md"
  else echo "| $1 | no nvidia-smi | | |" >> "$OUT/utilisation.md"; fi
}

echo "# Device check, $(date -u +%F) $( [ $REHEARSAL = 1 ] && echo '(CPU rehearsal)')" > "$REPORT"
section "Machine"
"$PY" - >> "$REPORT" <<'EOF'
import platform, torch
print(f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
else:
    print(f"- no GPU: {platform.processor() or platform.machine()}")
EOF

section "CUDA tests (tests/test_cuda.py)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/pytest-cuda.log" 2>&1 || true
tail -1 "$OUT/pytest-cuda.log" >> "$REPORT"

section "Updates per second (benchmark/speed.py)"
sample_gpu speed
"$PY" benchmark/speed.py "${SPEED[@]}" --baselines so2-iql --output "$OUT/speed.md" > "$OUT/speed.log" 2>&1
stop_gpu speed
cat "$OUT/speed.md" >> "$REPORT"

section "A short fine-tuning on a dataset built here"
"$PY" benchmark/make_dataset.py --env hopper --levels medium --from-policy "${SIZE[@]}" > "$OUT/dataset.log" 2>&1
sample_gpu run
"$PY" baq_iql.py --env-id baq/hopper/medium-v0 --runs-dir "$OUT/runs" "${DEV[@]}" "${RUN[@]}" --eval-episodes 2 \
  > "$OUT/run.log" 2>&1
stop_gpu run
RUN_DIR="$(ls -d "$OUT"/runs/*/ | head -1)"
"$PY" - "$RUN_DIR" >> "$REPORT" <<'EOF'
import math, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
events.Reload()
bad = [t for t in events.Tags()["scalars"] if not all(math.isfinite(e.value) for e in events.Scalars(t))]
score = events.Scalars("eval/normalized_score")
print(f"- {len(events.Tags()['scalars'])} tags, {'all finite' if not bad else 'NOT FINITE: ' + ', '.join(bad)}; "
      f"normalized score {score[0].value:.1f} at step 0, {score[-1].value:.1f} at step {score[-1].step}")
EOF
CUDA_VISIBLE_DEVICES="" "$PY" baq_iql.py --env-id baq/hopper/medium-v0 --runs-dir "$OUT/cpu-runs" --no-cuda \
  --offline-checkpoint "$RUN_DIR/offline.pt" --bc-checkpoint "$RUN_DIR/bc.pt" --online-steps 100 --eval-every 100 \
  --eval-episodes 1 > "$OUT/cpu-handoff.log" 2>&1 \
  && echo "- its offline.pt and bc.pt fine-tune in a CPU-only process (CUDA_VISIBLE_DEVICES=\"\")" >> "$REPORT" \
  || echo "- FAILED: its checkpoints in a CPU-only process (see cpu-handoff.log)" >> "$REPORT"

section "Runs at once on one device (plain processes)"
for n in "${PACK[@]}"; do
  sample_gpu "pack$n"
  for i in $(seq "$n"); do
    "$PY" baq_iql.py --env-id baq/hopper/medium-v0 --runs-dir "$OUT/pack$n" --seed "$i" "${DEV[@]}" --no-compile \
      --offline-checkpoint "$RUN_DIR/offline.pt" --bc-checkpoint "$RUN_DIR/bc.pt" --online-steps $PACK_STEPS \
      --eval-every $PACK_STEPS --eval-episodes 1 > "$OUT/pack$n-$i.log" 2>&1 &
  done
  wait
  stop_gpu "pack$n"
done
"$PY" - "$OUT" "${PACK[@]}" >> "$REPORT" <<'EOF'
import glob, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
print("| runs at once | online steps/s of all runs together | per run |\n|---|---|---|")
for n in sys.argv[2:]:
    rates = []
    for run in glob.glob(os.path.join(sys.argv[1], f"pack{n}", "*")):
        events = EventAccumulator(run, size_guidance={"scalars": 0})
        events.Reload()
        rates.append(events.Scalars("charts/SPS")[-1].value)
    print(f"| {n} | {sum(rates):.0f} | {sum(rates) / max(len(rates), 1):.0f} ({len(rates)} finished) |")
print("\n(charts/SPS at each run's end: steps with one update each, eager, evaluations included)")
EOF

section "GPU utilisation (nvidia-smi every 0.5 s)"
printf '| phase | mean utilisation | samples | memory |\n|---|---|---|---|\n' >> "$REPORT"
cat "$OUT/utilisation.md" >> "$REPORT" 2>/dev/null || true
echo "done: $REPORT"
