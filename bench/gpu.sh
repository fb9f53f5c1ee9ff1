#!/usr/bin/env bash
# One short prepared GPU check (under 8 minutes on one H100/H200): a ~125M Llama-style decoder at
# bf16-mixed, sequence 1024, torch.compile, through our Lightning path and a plain PyTorch loop side
# by side; prints tokens/s and MFU (6N + 12·L·d·T FLOPs per token against the planner's peak table).
#     bash bench/gpu.sh            # PY=/path/to/python to pick the interpreter (needs the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
# 60 steps of 16 x 1024 tokens; the first 20 (compilation, warm-up) are not timed
timeout 450 "$PY" bench/train.py --accelerator gpu --preset 125m --seq-len 1024 --batch-size 16 \
    --precision bf16-mixed --compile --steps 60 --skip 20 --rounds 1
