#!/usr/bin/env bash
# Train latentgen's embedded default models on the procedural shapes set (64x64), on CPU:
#   1. a KL autoencoder, f=4 (64x64 -> 16x16x3 latents)           -> assets/default-ae.safetensors
#   2. a text-to-image LDM (BERT tokenizer + transformer, CFG)     -> assets/default-txt2img.safetensors
#   3. a 4x super-resolution LDM (16x16 RGB -> 64x64)               -> assets/default-superres.safetensors
# The shipped run took about 65 minutes on 2 shared CPU cores (AMD EPYC, no bf16) with these step counts; every count is a variable, e.g.
#   AE_STEPS=20 TXT_STEPS=20 SR_STEPS=20 scripts/train_default.sh /tmp/tiny   (a smoke run of a few minutes)
# Re-running resumes each stage from its folder (the options must stay the same; steps may grow).
# Set INSTALL=0 to leave src/latentgen/assets alone. Multi-core / multi-GPU: prefix LATENTGEN with torchrun.
set -euo pipefail

WORK=${1:-runs/default}
AE_STEPS=${AE_STEPS:-1400}
TXT_STEPS=${TXT_STEPS:-1746}
SR_STEPS=${SR_STEPS:-4000}
AE_BATCH=${AE_BATCH:-6}
LDM_BATCH=${LDM_BATCH:-16}
DISC_START=${DISC_START:-700}
DATA=${DATA:-shapes:20000}
SAVE_EVERY=${SAVE_EVERY:-500}
SAMPLE_EVERY=${SAMPLE_EVERY:-1000}
INSTALL=${INSTALL:-1}
SAVE_DTYPE=${SAVE_DTYPE:-float16}
LATENTGEN=${LATENTGEN:-"python -m latentgen.cli"}
# One thread per process: on 2 shared cores, oversubscribed threads run several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ASSETS="$HERE/../src/latentgen/assets"
mkdir -p "$WORK"
resume() { [ -f "$1/state.safetensors" ] && echo "--resume $1" || echo "--out $1"; }

echo "== 1/3 autoencoder ($AE_STEPS steps)" >&2
$LATENTGEN train-ae --data "$DATA" --reg kl --f 4 $(resume "$WORK/ae") --size 64 \
  --ch 32 --ch-mult 1,1,2 --num-res-blocks 1 --embed-dim 3 --save-dtype "$SAVE_DTYPE" \
  --steps "$AE_STEPS" --batch-size "$AE_BATCH" --lr 4e-4 --warmup 50 \
  --kl-weight 1e-6 --perceptual-weight 1.0 --disc-start "$DISC_START" --disc-weight 0.5 --disc-layers 2 --disc-ch 16 \
  --ema-decay 0.995 --save-every "$SAVE_EVERY" --sample-every "$SAMPLE_EVERY" --log-every 25

# Stages 2 and 3 only share the frozen autoencoder: they run side by side, one core each.
echo "== 2/3 text-to-image LDM ($TXT_STEPS steps) and 3/3 super-resolution LDM ($SR_STEPS steps), in parallel" >&2
$LATENTGEN train-ldm --data "$DATA" --ae "$WORK/ae/autoencoder.safetensors" --cond text $(resume "$WORK/txt2img") \
  --size 64 --prediction eps --cond-drop 0.1 \
  --model-channels 64 --channel-mult 1,2,2 --num-res-blocks 1 --attention-resolutions 2,4 --num-head-channels 32 \
  --text-dim 128 --text-layers 2 --text-heads 4 \
  --steps "$TXT_STEPS" --batch-size "$LDM_BATCH" --lr 5e-4 --warmup 100 --ema-decay 0.995 \
  --save-every "$SAVE_EVERY" --sample-every "$SAMPLE_EVERY" --log-every 25 --save-dtype "$SAVE_DTYPE" &
TXT_PID=$!
$LATENTGEN train-ldm --data "$DATA" --ae "$WORK/ae/autoencoder.safetensors" --cond sr $(resume "$WORK/superres") \
  --size 64 --prediction eps \
  --model-channels 32 --channel-mult 1,2,2 --num-res-blocks 1 --attention-resolutions 4 --num-head-channels 32 \
  --steps "$SR_STEPS" --batch-size "$LDM_BATCH" --lr 5e-4 --warmup 100 --ema-decay 0.995 \
  --save-every "$SAVE_EVERY" --sample-every "$SAMPLE_EVERY" --log-every 25 --save-dtype "$SAVE_DTYPE"
wait "$TXT_PID"

if [ "$INSTALL" = 1 ]; then
  cp "$WORK/txt2img/model.safetensors" "$ASSETS/default-txt2img.safetensors"
  cp "$WORK/superres/model.safetensors" "$ASSETS/default-superres.safetensors"
  # the settings the CLI uses by default for these models (64x64, CFG 3 measured best of 3 and 6)
  python - "$ASSETS" <<'PY'
import json, sys
from latentgen.checkpoint import read_safetensors, write_safetensors
rec = {"default-txt2img": {"steps": 25, "sampler": "dpmpp_2m", "cfg": 3.0, "width": 64, "height": 64},
       "default-superres": {"steps": 25, "sampler": "dpmpp_2m", "cfg": 1.0}}
for name, r in rec.items():
    path = f"{sys.argv[1]}/{name}.safetensors"
    tensors, meta = read_safetensors(path)
    cfg = json.loads(meta["latentgen"])
    cfg["recommended"], cfg["name"] = r, name.replace("-txt2img", "")
    meta["latentgen"] = json.dumps(cfg)
    write_safetensors(path, tensors, meta)
PY
  du -ch "$ASSETS"/default-*.safetensors >&2
fi
echo "done: evaluate with  python $HERE/evaluate_default.py --ae $WORK/ae/autoencoder.safetensors \\" >&2
echo "      --txt2img $WORK/txt2img/model.safetensors --superres $WORK/superres/model.safetensors --out $WORK/eval" >&2
