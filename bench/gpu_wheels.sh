#!/usr/bin/env bash
# Wheels for a GPU machine whose image has torch, transformers, accelerate and peft but not diffusers,
# modelscope or bitsandbytes (Python 3.12, no network there). Writes .whl/ (git-ignored); carry it and run
# bench/run_gpu.sh, which installs it. bitsandbytes keeps only its CUDA 13.0 library (the image's torch is
# cu130), which brings the wheels from 79 MB to under the 64 MiB a call can carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
download diffusers==0.42.1 modelscope==1.40.2 modelscope_hub==0.5.1 addict datasets==4.8.4 dill multiprocess \
  boto3 botocore s3transfer jmespath trio outcome sniffio cryptography cffi pycparser lazy-importer \
  torchsde==0.2.6 trampoline==0.1.2
download bitsandbytes==0.50.2
python3 - <<'PY'
import glob, os, re, zipfile
(path,) = glob.glob('.whl/bitsandbytes-*.whl')
drop = re.compile(r'bitsandbytes/libbitsandbytes_(?!cuda130|cpu)\w+\.so$')
with zipfile.ZipFile(path) as src:
    names = [n for n in src.namelist() if not drop.match(n)]
    files = {n: src.read(n) for n in names}
record = next(n for n in names if n.endswith('.dist-info/RECORD'))
files[record] = b''.join(line + b'\n' for line in files[record].splitlines()
                         if not drop.match(line.split(b',')[0].decode()))
tmp = path + '.tmp'
with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as out:
    for name in names:
        out.writestr(name, files[name])
os.replace(tmp, path)
PY
du -sh .whl
