#!/usr/bin/env bash
# Download, into .whl/, every wheel the GPU device machine lacks for `python -m bench.train_step` and
# `python -m bench.apply_identity` with the PyPI host comfyui==0.0.1. Run HERE (pip reaches PyPI); then run
# bench/device/run.sh on the device with carry [".whl"] (see bench/README.md, "On a GPU machine").
#
# The device (Python 3.12, torch 2.11+cu130) already has torch, torchvision, numpy, safetensors, scipy, aiohttp,
# accelerate, einops, requests, pyyaml, regex, protobuf, wrapt, ... (its image's package list is in the device
# tool's KINDS.md). It lacks comfyui and what comfyui imports on the bench path, and its transformers 5 breaks
# comfy.sd1_clip, so the kit carries transformers 4.x with a tokenizers/huggingface_hub that it accepts; installed
# with --target /tmp/site and put first on PYTHONPATH, they shadow the device's own.
#
# The list below is what the two benches really import (traced with sys.modules on the CPU host, then checked
# by bench/device/emulate.sh in a venv holding only the device's packages). Versions are the ones the repo's
# own CPU venv runs with. Not carried, because nothing on the path imports them: the pack's face backend
# (dlib-bin, face-recognition-models: imported on first use only), open-clip, fschat, bitsandbytes, albumentations,
# clean-fid, OpenEXR, jsonmerge, frozendict, pyjwt, hf-xet, googleapis-common-protos, opentelemetry's grpc/jaeger
# exporters and distro.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
MAX_MIB=40

PKGS=(
  # the host and what it needs that the device lacks
  comfyui==0.0.1  # yanked on PyPI: an exact pin still resolves
  configargparse==1.9.0
  torchsde==0.2.6 trampoline==0.1.2
  spandrel==0.4.2
  kornia==0.9.0 kornia-rs==0.2.0
  lazy-object-proxy==1.13.0
  can-ada==3.0.0
  natsort==8.4.0
  ftfy==6.3.1 wcwidth==0.9.4
  aio-pika==10.2.1 aiormq==7.2.4 pamqp==4.0.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-instrumentation==0.66b2
  opentelemetry-instrumentation-requests==0.66b2 opentelemetry-util-http==0.66b2
  opentelemetry-instrumentation-aio-pika==0.43b0
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  # comfy.sd1_clip needs transformers 4.x; transformers 4.57.6 wants huggingface-hub<1.0 and tokenizers<=0.23.0
  transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
)

norm() { tr 'A-Z' 'a-z' <<<"$1" | sed -E 's/[-_.]+/_/g'; }   # PEP 503-ish name, as in wheel file names

BASE_PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # NAME==VERSION [extra pip args]
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${BASE_PLATFORMS[@]}" "${@:2}" -d "$DEST" "$1" 2>&1 | { grep -v -E "yanked|is ignored: it is neither" || true; }
}

mkdir -p "$DEST"
declare -A WANT=()
for spec in "${PKGS[@]}"; do
  name=$(norm "${spec%%==*}"); version=${spec##*==}
  WANT[$name]=$version
  if compgen -G "$DEST/${name}-${version}-*.whl" >/dev/null; then continue; fi   # already here
  echo "downloading $spec"
  if ! download "$spec" || ! compgen -G "$DEST/${name}-${version}-*.whl" >/dev/null; then
    extra=()
    for n in 24 31 34 35 39; do extra+=(--platform "manylinux_2_${n}_x86_64"); done
    download "$spec" "${extra[@]}"
  fi
  compgen -G "$DEST/${name}-${version}-*.whl" >/dev/null || { echo "prepare.sh: no cp312 x86-64 wheel for $spec" >&2; exit 1; }
done

# Keep exactly one version of each package and nothing else: run.sh installs .whl/*.whl as a whole.
for f in "$DEST"/*.whl; do
  base=$(basename "$f"); name=$(norm "${base%%-*}"); rest=${base#*-}; version=${rest%%-*}
  if [[ "${WANT[$name]:-}" != "$version" ]]; then echo "removing $base (not in this kit)"; rm -f "$f"; fi
done

# transformers' own requirements must accept the carried tokenizers and huggingface-hub.
python3 - "$DEST" <<'PY'
import glob, re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
dest = sys.argv[1]
have = {}
for f in glob.glob(f"{dest}/*.whl"):
    name, version = f.rsplit("/", 1)[1].split("-")[:2]
    have[re.sub(r"[-_.]+", "-", name).lower()] = version
(tf,) = glob.glob(f"{dest}/transformers-*.whl")
meta = next(n for n in zipfile.ZipFile(tf).namelist() if n.endswith(".dist-info/METADATA"))
bad = []
for line in zipfile.ZipFile(tf).read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        req = Requirement(line.split(":", 1)[1].strip())
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in have and not req.specifier.contains(have[key], prereleases=True):
            bad.append(f"{req} (kit has {have[key]})")
if bad:
    sys.exit("transformers does not accept the kit's: " + ", ".join(bad))
print("transformers requirements met by the kit: tokenizers", have["tokenizers"], "huggingface-hub", have["huggingface-hub"])
PY

echo "kit in $DEST/:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
count=$(ls "$DEST"/*.whl | wc -l)
awk -v t="$total" -v c="$count" 'BEGIN { printf "%d wheels, %.2f MiB in all\n", c, t / 1048576 }'
if (( total > MAX_MIB * 1048576 )); then echo "prepare.sh: the kit is over ${MAX_MIB} MiB" >&2; exit 1; fi
