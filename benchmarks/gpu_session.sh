#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one go (each step time-boxed, so one hang cannot eat the others):
#   1. environment (nvidia-smi, versions)
#   2. benchmarks/mfu.py: MFU of the `default` preset's train step in bf16, eager vs compiled, SDPA vs FlexAttention
#   3. `nanovlm train --preset tiny --device cuda --compile` under a forced terminal: the live dashboard's CUDA
#      memory panel (last frame as text) and the run's summary
#   4. `nanovlm vram --preset default` on CUDA
#   5. benchmarks/run.py --suite gpu: ours vs transformers in bf16 (train step, pipeline, generate)
# Results land in $OUT (default benchmarks/results/gpu); at most 8 files, so the device tool can bring them back.
#
#   bash benchmarks/gpu_session.sh    # where CUDA is visible; about 9 minutes at most (the time boxes below)
#   RUN_SIZES='default tiny,original_small' bash benchmarks/gpu_session.sh   # more run.py groups
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

step environment
{ nvidia-smi; $PY -c "import torch, transformers, rich, typer; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } >>"$LOG" 2>&1

step "mfu (default preset, bf16)"
timeout 220 $PY benchmarks/mfu.py --preset default --batch-size ${MFU_BATCH:-2} --samples-per-row 2 --warmup 2 \
  --steps 4 --json "$OUT/mfu_default.json" >>"$LOG" 2>&1 || echo "mfu exited $?" | tee -a "$LOG"

step "tiny preset on cuda with --compile, dashboard on a forced terminal"
rm -rf /tmp/nanovlm_gpu_tiny
FORCE_COLOR=1 COLUMNS=110 timeout 110 $PY -m nanovlm_cli train --preset tiny --device cuda --compile \
  --max-steps 200 --num-workers 8 --output-dir /tmp/nanovlm_gpu_tiny --run-name tiny 2>"$OUT/dashboard.ansi" >>"$LOG" \
  || echo "train exited $?" | tee -a "$LOG"
$PY - "$OUT" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from rich.text import Text
out = Path(sys.argv[1])
raw = out.joinpath("dashboard.ansi").read_text(errors="replace")
frames = Text.from_ansi(raw).plain.split("╭─ nanovlm train")
out.joinpath("dashboard.txt").write_text("╭─ nanovlm train" + frames[-1] if len(frames) > 1 else raw[-6000:])
out.joinpath("dashboard.ansi").unlink()
run = Path("/tmp/nanovlm_gpu_tiny/tiny")
facts = {}
if run.joinpath("summary.json").is_file():
    facts["summary"] = json.loads(run.joinpath("summary.json").read_text())
if run.joinpath("metrics.jsonl").is_file():
    lines = run.joinpath("metrics.jsonl").read_text().splitlines()
    facts["metrics_first"], facts["metrics_last"] = json.loads(lines[0]), json.loads(lines[-1])
out.joinpath("tiny_cuda.json").write_text(json.dumps(facts, indent=2))
EOF

step "vram (default preset)"
timeout 80 $PY -m nanovlm_cli vram --preset default --device cuda --batch-sizes 1 2 4 --json \
  >"$OUT/vram_default.json" 2>>"$LOG" || echo "vram exited $?" | tee -a "$LOG"

step "ours vs transformers, bf16"
for sizes in ${RUN_SIZES:-default}; do  # one JSON per group, so a timeout loses one group only
  timeout ${RUN_TIMEOUT:-130} $PY benchmarks/run.py --suite gpu --sizes "$sizes" --repeats 3 \
    --json "$OUT/speed_gpu_${sizes//,/_}.json" >>"$LOG" 2>&1 || echo "run.py $sizes exited $?" | tee -a "$LOG"
done
step done
