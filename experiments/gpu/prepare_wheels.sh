#!/usr/bin/env bash
# Run here, before a device call: fills .whl/ (ignored by git) with the wheels experiments/gpu/check.sh installs
# on the GPU machine (Python 3.12, no registry there) and SmolLM2's config + tokenizer (.whl/smollm2/; its
# 94 MiB GGUF does not fit a call, so the device builds a random-init model of that shape for throughput).
# Versions are the ones this checkout's .venv has (pyproject.toml's pins and what they resolved to).
# deepspeed and antlr4-python3-runtime are published as sdists only: built here into pure-Python wheels
# (DS_BUILD_OPS=0: no compiled op; the check uses torch's AdamW, so none is needed). transformers is carried
# too, so the device runs the pinned version (its image has another). Fails if the tree that travels would
# exceed the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
dest=.whl
limit=$((64 * 1024 * 1024))

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
binary=(transformers datasets dill multiprocess hydra-core omegaconf hjson pydantic pydantic-core annotated-types
        typing-inspection typing-extensions)
built=(deepspeed antlr4-python3-runtime)

mkdir -p "$dest"
rm -f "$dest"/*.whl   # one version of each: two stop the whole install
pins=()
for name in "${binary[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"
pins=()
for name in "${built[@]}"; do pins+=("$name==$(version "$name")"); done
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "${pins[@]}"

# SmolLM2-135M-Instruct's config and tokenizer (converted once into the model cache), without the weights
"$PY" - "$dest/smollm2" <<'PY'
import shutil
import sys
from pathlib import Path

from teams_rl.models import resolve_model

source, target = Path(resolve_model("smollm2")), Path(sys.argv[1])
shutil.rmtree(target, ignore_errors=True)
target.mkdir(parents=True)
for path in source.iterdir():
    if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("."):
        shutil.copy2(path, target / path.name)
PY

carried=$(du -sb "$dest" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
ls -l "$dest"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $9}'
echo "carried .whl: $((carried / 1024)) KiB; working tree: $((tree / 1024)) KiB; together $(((carried + tree) / 1024 / 1024)) MiB of 64"
if [ $((carried + tree)) -gt "$limit" ]; then
  echo "error: more than the 64 MiB a device call carries" >&2
  exit 1
fi
