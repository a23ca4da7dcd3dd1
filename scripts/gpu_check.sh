#!/usr/bin/env bash
# The GPU check of issue 13, as-is on a lent CUDA machine (torch + transformers there; no install, no
# network, no weights): fp32 exactness of batched AGD on tiny models of every architecture, then a
# random-init Llama-3.1-8B in bf16 (batch vs single agreement, batched throughput, latency).
# Under 8 minutes on one H100/H200-class GPU. Results: gpu-check/ (JSON + markdown).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
exec timeout 480 python scripts/gpu_check.py --device "${DEVICE:-cuda}" --shape "${SHAPE:-llama-3.1-8b}" --dtype "${DTYPE:-bfloat16}" --out "${OUT:-gpu-check}" "$@"
