#!/usr/bin/env bash
# Regenerates the images in docs/images/ from real runs on this machine, with the commands docs/index.md lists:
#   scripts/docs-images.sh                 # all: curves, scaling, memory, then draw (~12 min on 2 cores)
#   scripts/docs-images.sh scaling plot    # only some parts; `plot` alone redraws from the saved results
# curves:  the README's main job (jobs/glyphs-maml.yaml, ~7 min), its output under runs/docs-images/ (replaced).
# scaling: `metascale bench scaling --sizes 0.1M,10M --steps 3` -> docs/bench-results/cpu-scaling.json (~1.5 min).
# memory:  `metascale bench memory --coordinator-params 0` -> docs/bench-results/cpu-memory.json (~3 min; the
#          coordinator's 1B-parameter figure needs ~17 GB and is not drawn, so it is skipped here).
# plot:    `metascale plot` of each into docs/images/, and of docs/bench-results/h100-memory.json (measured on an
#          H100 with `metascale bench memory --device cuda`; redrawn only, as measuring it needs that GPU).
# Not part of the test suite (it measures); tests/test_bench_figures.py and tests/test_plot.py test the drawing.
set -euo pipefail
cd "$(dirname "$0")/.."
ms=(${METASCALE:-.venv/bin/metascale})
export RAY_AUTH_MODE=disabled
run_dir=runs/docs-images/glyphs-maml
results=docs/bench-results
images=docs/images
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(curves scaling memory plot)

for part in "${parts[@]}"; do
  case "$part" in
    curves)
      rm -rf "$run_dir"
      "${ms[@]}" run jobs/glyphs-maml.yaml --set "checkpoint.dir=$run_dir/checkpoints" \
        --set "logging.wandb.dir=$run_dir"
      ;;
    scaling)
      "${ms[@]}" bench scaling --sizes 0.1M,10M --steps 3 | tail -n 1 > "$results/cpu-scaling.json.new"
      mv "$results/cpu-scaling.json.new" "$results/cpu-scaling.json"
      ;;
    memory)
      "${ms[@]}" bench memory --coordinator-params 0 | tail -n 1 > "$results/cpu-memory.json.new"
      mv "$results/cpu-memory.json.new" "$results/cpu-memory.json"
      ;;
    plot)
      mkdir -p "$images"
      "${ms[@]}" plot "$run_dir" --out "$images/main-job-curves.png"
      "${ms[@]}" plot "$results/cpu-scaling.json" --out "$images/scaling.png"
      "${ms[@]}" plot "$results/cpu-memory.json" --out "$images/memory.png"
      "${ms[@]}" plot "$results/h100-memory.json" --out "$images/memory-h100.png"
      ;;
    *)
      echo "error: unknown part '$part': expected curves, scaling, memory or plot" >&2
      exit 2
      ;;
  esac
done
