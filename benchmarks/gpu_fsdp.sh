#!/usr/bin/env bash
# FSDP2 on CUDA (NCCL, bf16), for a lent GPU machine; about 5 minutes on one H200.
#   probe  benchmarks/fsdp_probe.py over NCCL: the collectives, fully_shard, mixed precision and DCP
#   lib    benchmarks/gpu_fsdp.py: a random ~100M model, FSDP and DDP on every visible GPU (one GPU: a world of one):
#          per-step losses side by side, every rank's peak allocated memory against the memory model
#   cli    `nanovlm train --preset tiny --strategy fsdp` vs the default DDP under torchrun: per-step losses, the
#          final checkpoint answered by `nanovlm generate` in one process, and a SIGTERM + --resume run
# Prints a table and writes benchmarks/results/gpu_fsdp_<gpu>.json (intermediate files in $OUT).
#
#   bash benchmarks/gpu_fsdp.sh
#   NPROC=2 STEPS="lib" bash benchmarks/gpu_fsdp.sh
set -u
OUT=${OUT:-/tmp/nanovlm_gpu_fsdp}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
TORCHRUN="$PY -m torch.distributed.run --nproc-per-node $NPROC --master-port ${PORT:-29571}"
LOG="$OUT/session.log"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

probe_step() {
  timeout ${PROBE_TIMEOUT:-60} $TORCHRUN benchmarks/fsdp_probe.py nccl 2>>"$LOG" | tee "$OUT/probe.txt" \
    || say "probe exited $?"
}

lib_step() {
  for s in ddp fsdp; do
    timeout ${LIB_TIMEOUT:-150} $TORCHRUN benchmarks/gpu_fsdp.py --strategy $s --json "$OUT/lib_$s.json" \
      >>"$LOG" 2>&1 || say "gpu_fsdp.py --strategy $s exited $?"
  done
}

cli_step() {
  local args="train --preset tiny --device cuda --dataset-size 400 --batch-size 4 --pack-buffer 1 --max-steps 20
    --save-checkpoint-steps 10 --validation-steps 10 --eval-size 0 --num-workers 2 --output-dir $OUT/runs"
  rm -rf "$OUT/runs"
  for s in ddp fsdp; do
    timeout ${CLI_TIMEOUT:-120} $TORCHRUN -m nanovlm_cli $args --strategy $s --run-name $s >>"$LOG" 2>&1 \
      || say "train --strategy $s exited $?"
  done
  # stopped by SIGTERM after its step-10 checkpoint, then resumed: the losses must continue the uninterrupted run's
  $TORCHRUN -m nanovlm_cli $args --strategy fsdp --run-name resumed --save-checkpoint-steps 5 >>"$LOG" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    [ -d "$OUT/runs/resumed/checkpoints/step-000005" ] && break
    sleep 0.2
  done
  kill -TERM $pid; wait $pid
  timeout ${CLI_TIMEOUT:-120} $TORCHRUN -m nanovlm_cli train --resume "$OUT/runs/resumed" >>"$LOG" 2>&1 \
    || say "resume exited $?"
  $PY -c "from PIL import Image, ImageDraw; i = Image.new('RGB', (64, 64), 'white'); \
ImageDraw.Draw(i).ellipse((10, 10, 54, 54), fill='red'); i.save('$OUT/red_circle.png')"
  $PY -m nanovlm_cli generate "$OUT/red_circle.png" "What colour is the shape?" \
    --checkpoint "$OUT/runs/fsdp/final" --device cuda --json >"$OUT/generate.json" 2>>"$LOG" \
    || say "generate exited $?"
}

say "start: $NPROC process(es)"
nvidia-smi >>"$LOG" 2>&1
for step in ${STEPS:-probe lib cli}; do
  say "$step"
  ${step}_step
done
$PY - "$OUT" "$RESULTS" <<'PYEOF'
import json, sys
from pathlib import Path
out, results = Path(sys.argv[1]), Path(sys.argv[2])
report, gib = {}, 1024**3
for s in ("ddp", "fsdp"):
    f = out / f"lib_{s}.json"
    if f.is_file():
        report[f"lib_{s}"] = json.loads(f.read_text())
if report:
    print(f"{'strategy':<9}{'world':>6}{'peak GiB/rank (max)':>21}{'estimate GiB':>14}{'ratio':>7}")
    for key, r in report.items():
        peak, est = max(r["peak_bytes_per_rank"]), r["estimate_per_rank"]["total"]
        r["measured_over_estimate"] = peak / est
        print(f"{r['strategy']:<9}{r['world_size']:>6}{peak / gib:>21.3f}{est / gib:>14.3f}{peak / est:>7.2f}")
    if len(report) == 2:
        a, b = report["lib_ddp"]["losses"], report["lib_fsdp"]["losses"]
        report["lib_max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
        print("losses ddp :", " ".join(f"{x:.4f}" for x in a))
        print("losses fsdp:", " ".join(f"{x:.4f}" for x in b))
runs = out / "runs"
def losses(name):
    f = runs / name / "metrics.jsonl"
    return [json.loads(l)["loss"] for l in f.read_text().splitlines()] if f.is_file() else None
cli = {name: losses(name) for name in ("ddp", "fsdp", "resumed")}
if cli["ddp"] and cli["fsdp"]:
    cli["max_loss_diff_ddp_fsdp"] = max(abs(x - y) for x, y in zip(cli["ddp"], cli["fsdp"]))
    print(f"cli tiny: max |loss ddp - loss fsdp| over {len(cli['ddp'])} steps = {cli['max_loss_diff_ddp_fsdp']:.2e}")
if cli["fsdp"] and cli["resumed"]:
    cli["max_loss_diff_resumed"] = max(abs(x - y) for x, y in zip(cli["fsdp"], cli["resumed"]))
    print(f"cli tiny: max |loss fsdp - loss stopped+resumed| = {cli['max_loss_diff_resumed']:.2e}")
if (out / "probe.txt").is_file():
    report["probe"] = (out / "probe.txt").read_text().splitlines()
if (out / "generate.json").is_file():
    cli["generate"] = (out / "generate.json").read_text()[-2000:]
report["cli"] = cli
gpu = next((r["gpu"] for r in report.values() if isinstance(r, dict) and "gpu" in r), "gpu")
name = "h200" if "H200" in gpu else gpu.split()[-1].lower()
path = results / f"gpu_fsdp_{name}.json"
path.write_text(json.dumps(report, indent=2) + "\n")
print("written", path)
PYEOF
