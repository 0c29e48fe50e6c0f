#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels that the borrowed GPU machine lacks for
# bench/gpu_check.sh, into .whl/ (git-ignored: .gitignore):
#
#   bash tools/device_wheels.sh            # then carry ".whl" in the device call
#
# That machine (see bench/README.md) has python 3.12, torch 2.11, triton 3.6, transformers, numpy,
# safetensors and accelerate, but not pytest (the GPU tests), peft (the LoRA baselines) or
# bitsandbytes (the NF4 tests and the QLoRA baseline); and its setuptools may predate PEP 639
# (< 77 refuses pyproject.toml's `license = "Apache-2.0"`), so a setuptools 80 comes along.
# gpu_check.sh installs whatever lies in .whl/ into a private --target folder ahead of the installed
# packages, before anything else (no network, no pip resolver). bitsandbytes is repacked with only
# its CPU and CUDA 13.x libraries (43 MB -> 7 MB), so the carried tree stays far under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
DEST=.whl
WHEELS=(setuptools==80.9.0 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.19.2 peft==0.21.2 bitsandbytes==0.50.2)

rm -rf "$DEST" && mkdir -p "$DEST"
# PIP_CONSTRAINT= : the dev machine's pip constraints cap packages to its local disk copies
PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"

# repack bitsandbytes without the libraries a CUDA 13 machine never loads
python3 - "$DEST" <<'EOF'
import base64, glob, hashlib, os, re, sys, zipfile
dest = sys.argv[1]
for path in glob.glob(os.path.join(dest, "bitsandbytes-*.whl")):
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [n for n in zin.namelist()
                 if not (re.search(r"libbitsandbytes_\w+\.so$", n) and not keep.search(n))]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for n in names:
            if n == record:
                continue
            data = zin.read(n)
            zout.writestr(zin.getinfo(n), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{n},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        zout.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, path)
EOF
ls -la "$DEST"
du -sh "$DEST"
