#!/usr/bin/env bash
# The "after" column of bench/RESULTS.md's H200 table, in one prepared run. On a CUDA machine with torch but no
# package index, from the project root (see ../shared/gpu/h200-2026-12-04/README.md for the machine):
#
#   bash ../shared/gpu/bundle_site.sh .gpu/site.tgz     # first, here, where pip reaches the index (.gpu/ is ignored)
#   bash bench/gpu_h200.sh [OUT_DIR]                     # there: the bench stages, about 9 minutes
#   STAGES=train bash bench/gpu_h200.sh [OUT_DIR]        # there: relay train at real size, about 7 minutes
#
# OUT_DIR defaults to $OUT (the device tool's) or .gpu/out. Each stage has its own time limit and writes its
# log (and JSON) as it goes, so a stage cut short loses only itself. Stages, in order:
#   env        the GPU, torch, transformers, tokenizers
#   after      the recipe's step as relay train runs it now (lokr_forward, transformer_compile and
#              gradient_checkpointing_blocks all auto: materialised LoKr, compiled blocks, checkpointing by
#              memory), profiled: s/step, first step (compile), MFU, launches/step, peak memory
#   lokr_only  the materialised LoKr alone (no compile, every block checkpointed): that lever by itself
#   before     the step before this change (LyCORIS's bypass, eager, every block checkpointed), same session
#   kron       bench/bench_lokr.py at the recipe's 17,308 tokens: both LoKr paths per layer
#   tiny       relay make-tiny-model --preset tiny (failed here before on the T5 tokenizer)
#   train      (STAGES=train) make-tiny-model --preset sd35m, 24 demo images, then relay train at 1024², batch
#              4, 30 steps: its steps/s against the bench's (within 5%?), and its start-up (load, quantize,
#              compile) from its log's timestamps
set -uo pipefail
out=${1:-${OUT:-.gpu/out}}
mkdir -p "$out"
stages=${STAGES:-env after lokr_only before kron tiny}
if [ -f .gpu/site.tgz ] && ! python -c 'import diffusers, lycoris, optimum.quanto' 2>/dev/null; then
  tar xzf .gpu/site.tgz -C /tmp && export PYTHONPATH=/tmp/gpusite${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stage() {  # stage NAME LIMIT_S COMMAND...: run it if STAGES names it, log to $out/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc after $((SECONDS - start)) s"
  tail -n 30 "$out/$name.log"
}

bench=(python bench/gpu_step.py --configs a --render off --phase-steps 1)
before=(--lokr-forward bypass --transformer-compile off --checkpoint-blocks all)

stage env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv &&
  python -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__)"'
stage after 240 "${bench[@]}" --steps 8 --warmup 2 --profile --profile-steps 2 --out "$out/gpu_step_h200.json"
stage lokr_only 150 "${bench[@]}" --steps 5 --warmup 2 --no-profile --lokr-forward materialized \
  --transformer-compile off --checkpoint-blocks all --out "$out/gpu_step_h200_lokr_only.json"
stage before 120 "${bench[@]}" --steps 5 --warmup 2 --no-profile "${before[@]}" --out "$out/gpu_step_h200_before.json"
stage kron 60 python bench/bench_lokr.py --device cuda --tokens 17308 --rounds 3
stage tiny 60 python -m relay_train.cli make-tiny-model /tmp/relay-tiny --preset tiny

if [[ " $stages " == *" train "* ]]; then
  stages="$stages sd35m data"
  stage sd35m 240 python -m relay_train.cli make-tiny-model /tmp/relay-sd35m --preset sd35m
  stage data 60 python -m relay_train.cli make-demo-data /tmp/relay-data --count 24
  python - <<'EOF'
import json
backends = json.load(open("configs/demo/multidatabackend.json"))
backends[0].update(instance_data_dir="/tmp/relay-data", resolution=1024)
backends[1]["cache_dir"] = "/tmp/relay-cache/text"
json.dump(backends, open("/tmp/relay-backend.json", "w"), indent=2)
EOF
  stage train 420 python -m relay_train.cli train --config configs/demo/config.json \
    --set pretrained_model_name_or_path=/tmp/relay-sd35m --set data_backend_config=/tmp/relay-backend.json \
    --set resolution=1024 --set train_batch_size=4 --set max_train_steps=30 --set checkpointing_steps=30 \
    --set validation_disable=true --set output_dir=/tmp/relay-out --set resume_from_checkpoint=none
fi
