import subprocess
import sys


def test_import_pulls_no_heavy_dependency():
    code = ("import sys, cvxq_export, cvxq_export.sizes, cvxq_export.devices, cvxq_export.errors; "
            "heavy = [m for m in ('torch', 'onnx', 'gguf', 'llama_cpp', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import cvxq_export pulled in: {out}"
