#!/usr/bin/env bash
# The whole ARRA pipeline on the embedded `shapes` dataset, each step a plain command you can also run by hand:
#   render -> train the VQ tokenizer -> train the CLIP teacher -> encode -> train the GPT with ARRA -> sample a grid.
# A finished step leaves a marker in $OUT/.done/ and is skipped on the next run (rm -r out/ to start over).
# Settings come from the environment, so tests can run a reduced version in a temporary folder:
#   DATA_DIR (data/shapes)  OUT (out)  RENDER_ARGS VQ_ARGS TEACHER_ARGS TRAIN_ARGS SAMPLE_ARGS (extra --key=value)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/shapes}
OUT=${OUT:-out}
mkdir -p "$OUT/.done"
t_start=$SECONDS
: > "$OUT/times.txt"  # "name seconds" of each step run this time, for the summary
# This machine's fp32 matmul speed (utils.measure_peak_flops, the figure bench.py prints), on one thread as each
# trainer gets and on all of them as the encode and the GPT get: to place the step times against other machines.
peak_flops() { OMP_NUM_THREADS=$1 python -c "import torch; from utils import measure_peak_flops as m
print('%.0f GFLOP/s on %d thread(s)' % (m('cpu', torch.float32) / 1e9, torch.get_num_threads()))"; }
machine="fp32 matmul $(peak_flops 1), $(peak_flops "${OMP_NUM_THREADS:-$(nproc)}")"

step() {  # step NAME COMMAND...: run once, then remember that it finished
  local name=$1; shift
  if [ -f "$OUT/.done/$name" ]; then
    echo "== $name: done before, reusing (delete $OUT/.done/$name to redo)"
    return
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  touch "$OUT/.done/$name"
  echo "== $name finished in $((SECONDS - t0)) s"
  echo "$name $((SECONDS - t0)) s" >> "$OUT/times.txt"
}

# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
{
python data/shapes/prepare.py --out_dir="$DATA_DIR" ${RENDER_ARGS:-}
# The tokenizer and the teacher learn from the images alone, not from each other: train them side by side, one
# thread each. The teacher shows its progress here; the tokenizer writes to $OUT/tokenizer.log (summary below).
echo "== tokenizer: training in the background, log in $OUT/tokenizer.log"
OMP_NUM_THREADS=1 step tokenizer python data/shapes/train_tokenizer.py --data_dir="$DATA_DIR" \
    --out_dir="$OUT/vqgan_shapes" ${VQ_ARGS:-} > "$OUT/tokenizer.log" 2>&1 &
tokenizer=$!
OMP_NUM_THREADS=1 step teacher python data/shapes/train_teacher.py --data_dir="$DATA_DIR" \
    --out_dir="$OUT/teacher_shapes" ${TEACHER_ARGS:-}
wait $tokenizer || { tail -n 20 "$OUT/tokenizer.log"; exit 1; }
grep -E '^(== |trained|saved)' "$OUT/tokenizer.log" || true
t_encode=$SECONDS
python data/shapes/prepare.py --stage=encode --out_dir="$DATA_DIR" ${RENDER_ARGS:-} \
    --vqgan="$OUT/vqgan_shapes/ckpt.pt" --teacher="$OUT/teacher_shapes/teacher.pt"
echo "encode $((SECONDS - t_encode)) s" >> "$OUT/times.txt"
step gpt python train.py --data_dir="$DATA_DIR" --out_dir="$OUT/shapes" ${TRAIN_ARGS:-}
python sample.py --ckpt="$OUT/shapes/ckpt.pt" --out="$OUT/shapes/demo.png" --num_samples=8 ${SAMPLE_ARGS:-} \
    --prompt "a large red circle in the top left" \
    --prompt "a small blue square in the center on a striped background" \
    --prompt "a large yellow triangle in the bottom right and a small white cross in the top left" \
    --prompt "a large green diamond in the center on a plain navy background" \
    --prompt "a small orange cross in the middle right on a brown background" \
    --prompt "a large purple circle in the bottom center and a small green square in the top right"
}
echo "== pipeline finished in $((SECONDS - t_start)) s. Samples: $OUT/shapes/demo.png (one row per prompt)."
echo "   steps: $(paste -sd ',' "$OUT/times.txt" | sed 's/,/, /g'); this machine: $machine"
echo "   Try your own: python sample.py --ckpt=$OUT/shapes/ckpt.pt --prompt \"a small white circle in the center\""
