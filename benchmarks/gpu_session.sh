#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one go; each step is time-boxed so one hang cannot eat the others.
#   env    nvidia-smi and versions
#   mfu    benchmarks/mfu.py: MFU of the `default` preset's train step in bf16 (compiled FlexAttention first)
#   tiny   `nanovlm train --preset tiny --device cuda --compile` on a forced terminal: the dashboard's last frame
#          (CUDA memory panel) as text, the run's summary, and `nanovlm generate` on a red circle
#   vram   `nanovlm vram --preset default` on CUDA (measured vs estimated)
#   speed  benchmarks/run.py --suite gpu: ours vs transformers in bf16 (RUN_CASES, RUN_SIZES groups)
# Results land in $OUT (default benchmarks/results/gpu): at most 8 files, so the device tool brings them back.
#
#   bash benchmarks/gpu_session.sh                       # everything: about 9 minutes at most on an H100/H200
#   STEPS="mfu tiny" bash benchmarks/gpu_session.sh      # a subset
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

env_step() {
  { nvidia-smi; $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } >>"$LOG" 2>&1
}

mfu_step() {
  timeout ${MFU_TIMEOUT:-220} $PY benchmarks/mfu.py --preset default --batch-size ${MFU_BATCH:-2} --samples-per-row 2 \
    --warmup 2 --steps 4 --json "$OUT/mfu_default.json" >>"$LOG" 2>&1 || say "mfu exited $?"
}

tiny_step() {
  local run=/tmp/nanovlm_gpu_tiny
  rm -rf $run
  FORCE_COLOR=1 COLUMNS=110 timeout ${TINY_TIMEOUT:-110} $PY -m nanovlm_cli train --preset tiny --device cuda \
    --compile --max-steps ${TINY_STEPS:-200} --num-workers 8 --output-dir $run --run-name tiny \
    2>"$OUT/dashboard.ansi" >>"$LOG" || say "train exited $?"
  $PY - "$OUT" $run/tiny >>"$LOG" 2>&1 <<'PYEOF'
import json, subprocess, sys
from pathlib import Path
from rich.text import Text
from nanovlm_cli.data.shapes import Scene, Shape
out, run = Path(sys.argv[1]), Path(sys.argv[2])
raw = out.joinpath("dashboard.ansi").read_text(errors="replace")
frames = Text.from_ansi(raw).plain.split("╭─ nanovlm train")
out.joinpath("dashboard.txt").write_text("╭─ nanovlm train" + frames[-1] if len(frames) > 1 else raw[-6000:])
out.joinpath("dashboard.ansi").unlink()
facts = {}
if run.joinpath("summary.json").is_file():
    facts["summary"] = json.loads(run.joinpath("summary.json").read_text())
if run.joinpath("metrics.jsonl").is_file():
    lines = run.joinpath("metrics.jsonl").read_text().splitlines()
    facts["metrics_first"], facts["metrics_last"] = json.loads(lines[0]), json.loads(lines[-1])
image = Path("/tmp/red_circle.png")
Scene((Shape("circle", "red", (33, 31), 22),), (255, 255, 255), "centre", "large").render().save(image)
answer = subprocess.run([sys.executable, "-m", "nanovlm_cli", "generate", str(image), "What colour is the shape?",
                         "--checkpoint", str(run / "final"), "--device", "cuda", "--json"], capture_output=True,
                        text=True, check=False)
facts["generate"] = {"rc": answer.returncode, "stdout": answer.stdout[-2000:], "stderr": answer.stderr[-2000:]}
out.joinpath("tiny_cuda.json").write_text(json.dumps(facts, indent=2))
PYEOF
}

vram_step() {
  timeout ${VRAM_TIMEOUT:-80} $PY -m nanovlm_cli vram --preset default --device cuda --batch-sizes 1 2 4 --json \
    >"$OUT/vram_default.json" 2>>"$LOG" || say "vram exited $?"
}

speed_step() {
  for sizes in ${RUN_SIZES:-default}; do  # one JSON per group, so a timeout loses one group only
    timeout ${RUN_TIMEOUT:-130} $PY benchmarks/run.py --suite gpu --sizes "$sizes" --repeats 3 \
      --cases ${RUN_CASES:-train,pipeline,generate} ${RUN_FLAGS:---compile-decode} \
      --json "$OUT/speed_gpu_${sizes//,/_}.json" >>"$LOG" 2>&1 || say "run.py $sizes exited $?"
  done
}

for s in ${STEPS:-env mfu tiny vram speed}; do
  say "$s"
  "${s}_step"
done
say done
