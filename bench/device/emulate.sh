#!/usr/bin/env bash
# Test the device kit HERE, without a GPU, as close to the device as this machine allows:
#   1. the kit's cp312 binary wheels install and import under a real CPython 3.12 (pyenv's, when present);
#   2. a throwaway venv OUTSIDE the repo ($EMU, default /tmp/devemu) holds only what the device already has on the
#      bench path (torch, torchvision, numpy, accelerate, aiohttp, requests, ... and transformers 5 with its
#      tokenizers / huggingface_hub, to prove the kit shadows them) -- no comfyui, no pack dependencies;
#   3. bench/device/run.sh runs there with SEFI_DEVICE_SMOKE=1 (tiny arguments, CPU), installing the kit with the
#      device's own pip command. Any ImportError there names a wheel that prepare.sh must add.
# This machine has Python 3.11 only for torch, so the venv is 3.11: the kit's pure-Python and abi3 wheels are used
# as they are, and its cp312-only binary wheels are replaced by the cp311 build of the same version.
# Usage: bash bench/device/prepare.sh && bash bench/device/emulate.sh      (a few minutes; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/../.."
EMU=${EMU:-/tmp/devemu}
WHEELS311=$EMU-whl
QUIET() { grep -v -E "is ignored: it is neither|yanked|already satisfied" || true; }

[[ -d .whl ]] || { echo "no .whl: run bash bench/device/prepare.sh first"; exit 1; }

# 1. cp312 binaries under CPython 3.12
PY312=$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12 || true)
if [[ -n $PY312 ]]; then
  rm -rf "$EMU-312"
  "$PY312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$EMU-312" .whl/*.whl
  mods=()
  for f in .whl/*-cp3*.whl; do mods+=("$(unzip -Z1 "$f" | grep -E '\.(so|abi3\.so)$' | head -1)"); done
  PYTHONPATH=$EMU-312 "$PY312" - "${mods[@]}" <<'PY'
import importlib, sys
for so in sys.argv[1:]:
    name = so.split(".")[0].replace("/", ".")  # pkg/_mod.cpython-312-....so -> pkg._mod
    importlib.import_module(name)
    print(f"cp312 import ok: {name} ({so})")
PY
else
  echo "no CPython 3.12 here: the cp312 binary wheels are not import-tested"
fi

# 2. the emulated device environment
if [[ ! -x $EMU/bin/python ]]; then
  python3.11 -m venv "$EMU"
fi
PIP=("$EMU/bin/python" -m pip --disable-pip-version-check -q)
if [[ ! -f $EMU/.ready ]]; then
  "${PIP[@]}" install torch==2.13.0 2>&1 | QUIET
  "${PIP[@]}" install torch==2.13.0 torchvision==0.28.0 \
    accelerate==1.15.0 aiofiles aiohttp einops filelock fsspec jinja2 opencv-python-headless pillow psutil pyyaml \
    regex requests scipy tqdm typing-extensions packaging protobuf sentencepiece sympy mpmath safetensors==0.8.0 \
    numpy wrapt python-dateutil scikit-image joblib cloudpickle peft timm pytorch-lightning==2.6.6 \
    torchdiffeq==0.2.5 sentencepiece==0.2.2 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0 2>&1 | QUIET
  touch "$EMU/.ready"
fi
"$EMU/bin/python" -c "import transformers; assert transformers.__version__.startswith('5.'), transformers.__version__; print('emulated device: transformers', transformers.__version__)"

# 3. the kit, with cp311 builds in place of its cp312-only wheels
rm -rf "$WHEELS311"; mkdir -p "$WHEELS311"
for f in .whl/*.whl; do
  base=$(basename "$f")
  if [[ $base == *-cp312-cp312-* ]]; then
    IFS=- read -r name version _ <<<"$base"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS311" "$name==$version" 2>&1 | QUIET
  else
    cp "$f" "$WHEELS311/"
  fi
done
echo "emulation kit: $(ls "$WHEELS311" | wc -l) wheels in $WHEELS311 (kit: $(ls .whl/*.whl | wc -l))"

rm -rf "$EMU-site"
PYTHON=$EMU/bin/python SEFI_DEVICE_SMOKE=1 SEFI_DEVICE_WHEELS=$WHEELS311 SEFI_DEVICE_SITE=$EMU-site \
  OUT=${OUT:-$EMU-out} bash bench/device/run.sh
