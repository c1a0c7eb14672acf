#!/usr/bin/env bash
# The CUDA paths of the project in one run, for any machine with a CUDA device (under 8 minutes on one H100):
#   1. python bench.py --device=cuda          bf16 matmul peak, GPT-B training tokens/s and MFU at 256 codes, ...
#   2. torchrun --nproc_per_node=1 train.py   50 steps of GPT-B in bf16 with torch.compile, through NCCL
#   3. the same run resumed from its checkpoint for 10 more steps
#   3b. 50 steps of GPT-B sharded with --fsdp=True (FSDP2) over all local GPUs (2 gloo ranks in DRY_RUN)
#   4. python sample.py on the GPU            KV cache + guidance, bf16 autocast, one PNG per sample
#   5. python fid.py on the GPU               over those samples against a second set (another seed)
# Each figure is printed on one line starting with "gpu_check:". The data are random arrays in the prepared-data
# format (data/common.py) with a random tokenizer and teacher: the figures are speed and plumbing, not quality.
# FID uses the pytorch-fid Inception weights when they are on disk (INCEPTION=PATH or the torch hub cache); without
# them it runs the same network with random weights and says so (a timing of the path, not a score).
#
#   bash scripts/gpu_check.sh                  # on a CUDA machine; WORK=DIR keeps the files (default: a temp dir)
#   DRY_RUN=1 bash scripts/gpu_check.sh        # the same steps at toy sizes on the CPU (gloo, no compile, no bench)
# Without a CUDA device (and without DRY_RUN) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" != 1 ] && ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device found; nothing to check here (DRY_RUN=1 runs the same steps on the CPU)"
  exit 0
fi
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
t_start=$SECONDS
say() { echo "gpu_check: $*"; }

if [ "$DRY_RUN" = 1 ]; then  # toy sizes: the plumbing of every step, on the CPU
  DATA="64 16 4 64 16 8"      # n_train n_val grid codebook teacher_dim text_len
  STEPS=4 MORE=2 SAMPLES=2 DEVICE=cpu NPROC=2
  TRAIN="--device=cpu --dtype=float32 --compile=False --n_layer=2 --n_head=2 --n_embd=64 --batch_size=8
         --max_iters=$STEPS --eval_interval=$STEPS --eval_rows=16 --log_interval=2 --peak_flops=1e11"
else
  DATA="2048 256 16 16384 512 16"
  STEPS=50 MORE=10 SAMPLES=16 DEVICE=cuda NPROC=$(nvidia-smi -L | wc -l)
  TRAIN="--model=B --dtype=bfloat16 --compile=True --batch_size=32 --max_iters=$STEPS --eval_interval=$STEPS
         --eval_rows=256 --log_interval=10"
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  $PY bench.py --device=cuda --repeats=2 > "$WORK/bench.txt"
  grep '^| ' "$WORK/bench.txt" | grep -v -e '^| figure' -e '^|---' \
    | sed 's/^| /gpu_check: bench: /; s/ |$//; s/ | /, /g'
fi

# random prepared data, a random tokenizer for it, and 4 prompts
# shellcheck disable=SC2086  # DATA is a word list on purpose
$PY - "$WORK" $DATA <<'EOF'
import os, sys
import numpy as np
import torch
from data.common import (tokenize_captions, write_split, write_meta, TEXT_PAD_ID, TEXT_SOT_ID, TEXT_EOT_ID,
                         TEXT_VOCAB_SIZE)
from vqgan import VQConfig, VQModel, save_vqgan, vqgan_identity
work, (n_train, n_val, grid, K, D, L) = sys.argv[1], map(int, sys.argv[2:])
torch.manual_seed(0)
vq = os.path.join(work, 'vq.pt')  # 4x downsampling: grid x grid codes of 4*grid px images
save_vqgan(VQModel(VQConfig(image_size=4 * grid, codebook_size=K, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                            z_channels=64, norm_groups=8)), vq)
data, rng = os.path.join(work, 'data'), np.random.default_rng(0)
os.makedirs(data, exist_ok=True)
for split, n in (('train', n_train), ('val', n_val)):
    captions = [f'a photo of object {i % 100}' for i in range(n)]
    teacher = rng.standard_normal((n, D))
    teacher = (teacher / np.linalg.norm(teacher, axis=1, keepdims=True)).astype(np.float16)
    codes = rng.integers(0, K, (n, grid * grid)).astype(np.uint16)
    write_split(data, split, dict(codes=codes, text=tokenize_captions(captions, L), teacher=teacher), captions)
write_meta(data, dict(dataset='random', splits=dict(train=n_train, val=n_val), image_size=4 * grid, grid=[grid] * 2,
                      image_tokens=grid * grid, codebook_size=K, text_len=L, text_vocab_size=TEXT_VOCAB_SIZE,
                      text_pad_id=TEXT_PAD_ID, text_sot_id=TEXT_SOT_ID, text_eot_id=TEXT_EOT_ID, teacher_dim=D,
                      teacher=dict(name='random', pretrained=None, path=None, sha256=None, dim=D),
                      vqgan=vqgan_identity(vq), captions=dict(train='train_captions.txt', val='val_captions.txt')))
with open(os.path.join(work, 'prompts.txt'), 'w') as f:
    f.write('a photo of object 1\na photo of object 2\na photo of object 3\n\n')
EOF

report() {  # report RUN_DIR LABEL: the last train and eval entries of a run's log, one line
  $PY - "$1" "$2" <<'EOF'
import json, sys
log = [json.loads(line) for line in open(sys.argv[1] + '/log.jsonl')]
t, e = [x for x in log if x['kind'] == 'train'][-1], [x for x in log if x['kind'] == 'eval'][-1]
print(f'gpu_check: {sys.argv[2]}: iter {t["iter"]}, {t["dt_ms"]:.0f} ms/step, {t["tokens_per_s"]:,.0f} tokens/s, '
      f'MFU {100 * t["mfu"]:.1f}% (of the measured peak), train CE {t["train_ce"]:.3f}, val CE {e["val_ce"]:.3f}')
EOF
}
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py --data_dir=$WORK/data --out_dir=$WORK/run
     --eval_samples=0"

t0=$SECONDS
# shellcheck disable=SC2086
$RUN $TRAIN > "$WORK/train.txt" 2>&1 || { tail -30 "$WORK/train.txt"; exit 1; }
report "$WORK/run" "train ($((SECONDS - t0)) s with start-up)"
t0=$SECONDS
# shellcheck disable=SC2086
$RUN --init_from=resume --compile=False --max_iters=$((STEPS + MORE)) > "$WORK/resume.txt" 2>&1 \
  || { tail -30 "$WORK/resume.txt"; exit 1; }
report "$WORK/run" "resume ($((SECONDS - t0)) s)"

t0=$SECONDS  # sharded: a fresh run of the same model under FSDP on every local GPU (compile off: not yet verified)
# shellcheck disable=SC2086
$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC train.py --data_dir=$WORK/data \
  --out_dir=$WORK/fsdp --eval_samples=0 $TRAIN --compile=False --fsdp=True > "$WORK/fsdp.txt" 2>&1 \
  || { tail -30 "$WORK/fsdp.txt"; exit 1; }
report "$WORK/fsdp" "fsdp ($NPROC ranks, $((SECONDS - t0)) s with start-up)"

t0=$SECONDS
for seed in 1 2; do
  $PY sample.py --ckpt="$WORK/run/ckpt.pt" --prompts_file="$WORK/prompts.txt" --num_samples=$SAMPLES --seed=$seed \
    --device=$DEVICE --out="$WORK/grid$seed.png" --out_dir="$WORK/samples$seed" > "$WORK/sample$seed.txt" 2>&1 \
    || { tail -30 "$WORK/sample$seed.txt"; exit 1; }
done
say "sample: 2 x $((4 * SAMPLES)) images (4 prompts, one empty) in $((SECONDS - t0)) s on $DEVICE: $WORK/grid1.png"

t0=$SECONDS
$PY - "$WORK" "$DEVICE" "${INCEPTION:-}" <<'EOF'
import os, sys
import fid
work, device, path = sys.argv[1], sys.argv[2], sys.argv[3] or fid.default_weights_path()
real = os.path.isfile(path)
model = fid.load_inception(path, device=device) if real else fid.FIDInceptionV3().to(device).eval()
value = fid.main([f'{work}/samples1', f'{work}/samples2', f'--device={device}', '--progress=False'], model=model)
print(f'gpu_check: fid: {value:.2f} between the two sample sets ' +
      ('(pytorch-fid weights)' if real else '(random Inception weights: a timing of the path, not a score)'))
EOF
say "fid took $((SECONDS - t0)) s; all steps $((SECONDS - t_start)) s; files in $WORK"
