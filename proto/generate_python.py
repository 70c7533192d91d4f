"""Generate Headrace's Python stubs from proto/ (run by `make proto`).

protoc's Python output needs two fixes to live inside the `headrace.protocol` package:

* its imports are absolute by proto path (`import model_config_pb2`); they become package
  imports;
* it registers its descriptors in protobuf's process-wide default pool, where Triton's own stubs
  (tritonclient, pytriton) register the same `inference.*` names; two different files defining
  one symbol cannot share a pool, so Headrace's stubs register in a pool of their own
  (`headrace.protocol.descriptor_pool.POOL`) and coexist with Triton's in one process.

Usage: python proto/generate_python.py OUTPUT_DIR
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
SERVICE_FILES = ("grpc_service.proto",)
PACKAGE = "headrace.protocol"


def _rewrite(text: str) -> str:
    modules = [Path(name).stem + "_pb2" for name in PROTO_FILES]
    for module in modules:
        text = re.sub(
            rf"^import {module}\b", f"from {PACKAGE} import {module}", text, flags=re.MULTILINE
        )
    return text.replace(
        "_descriptor_pool.Default().AddSerializedFile(",
        "_headrace_descriptor_pool.POOL.AddSerializedFile(",
    ).replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from google.protobuf import descriptor_pool as _descriptor_pool\n"
        f"from {PACKAGE} import descriptor_pool as _headrace_descriptor_pool\n",
    )


def generate(output_dir: Path) -> list[Path]:
    """Write the stubs into output_dir and return the files written."""
    plugin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as scratch:
        protoc = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO_DIR}"]
        mypy = shutil.which("protoc-gen-mypy", path=str(plugin_dir))
        mypy_grpc = shutil.which("protoc-gen-mypy_grpc", path=str(plugin_dir))
        messages = [f"--plugin=protoc-gen-mypy={mypy}", f"--python_out={scratch}"]
        services = [f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}", f"--grpc_python_out={scratch}"]
        run = {"check": True, "cwd": PROTO_DIR, "stdout": subprocess.DEVNULL}
        subprocess.run([*protoc, *messages, f"--mypy_out={scratch}", *PROTO_FILES], **run)
        subprocess.run([*protoc, *services, f"--mypy_grpc_out={scratch}", *SERVICE_FILES], **run)
        written = []
        output_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted(Path(scratch).iterdir()):
            target = output_dir / generated.name
            target.write_text(_rewrite(generated.read_text()))
            written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for path in generate(Path(sys.argv[1])):
        print(path)
