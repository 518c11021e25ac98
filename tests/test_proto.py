"""The committed Python stubs are exactly what protoc generates from protos/ (never hand-edited)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "protos/asr/v1/asr.proto")], check=True)
    for name in ("asr_pb2.py", "asr_pb2.pyi", "asr_pb2_grpc.py"):
        fresh = (tmp_path / "asr/v1" / name).read_text()
        committed = (ROOT / "asr/v1" / name).read_text()
        assert fresh == committed, f"asr/v1/{name} is stale: run `make proto` and commit the result"
