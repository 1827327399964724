"""Native prints stay off stdout: the fd-level guard, and a QNN session in a fresh process.

The QNN stack prints a ``# LIBNATIVE: ...`` banner to fd 1 once per process, when its backend
first initializes; ``edgec compile -t qnn-htp --json`` must still print only JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest

from edgec._native_stdout import native_stdout_to_stderr


def test_fd1_goes_to_stderr_inside_and_comes_back_after(capfd):
    os.write(1, b"before\n")
    with native_stdout_to_stderr():
        os.write(1, b"native\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    assert err == "native\n"


def test_restored_on_error_and_when_nested(capfd):
    with pytest.raises(ValueError), native_stdout_to_stderr():
        with native_stdout_to_stderr():
            os.write(1, b"inner\n")
        os.write(1, b"outer\n")  # the inner exit must not restore stdout yet
        raise ValueError
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert err == "inner\nouter\n"


def test_buffered_c_stdio_is_flushed_inside(capfd):
    """printf to a non-terminal is block-buffered: its bytes must not surface after restore."""
    try:
        libc = ctypes.CDLL(None)
        printf = libc.printf
    except (OSError, AttributeError, TypeError):
        pytest.skip("no C library printf to call")
    with native_stdout_to_stderr():
        printf(b"from C\n")
    libc.fflush(None)
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "from C\n"


# A tiny uint8 QDQ model (Relu) opened in a QnnSession; prints the outputs as JSON. With
# argv[1] == "unguarded" the guard is replaced by a no-op, to show what it keeps off stdout.
_SCRIPT = textwrap.dedent("""
    import contextlib, json, sys
    import numpy as np
    import onnx
    from onnx import TensorProto as T, helper as H, numpy_helper as nh

    import edgec.runtimes.qnn as qnn

    if sys.argv[1] == "unguarded":
        qnn.native_stdout_to_stderr = contextlib.nullcontext
    s = nh.from_array(np.array(0.02, np.float32), "s")
    z = nh.from_array(np.array(128, np.uint8), "z")
    nodes = [H.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             H.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             H.make_node("Relu", ["xd"], ["r"]),
             H.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
             H.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"])]
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                         [H.make_tensor_value_info("y", T.FLOAT, [1, 8])], [s, z])
    model = H.make_model(graph, opset_imports=[H.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, sys.argv[2])
    sess = qnn.QnnSession(sys.argv[2], {"backend": "htp"})
    y = sess.run({"x": np.linspace(-1, 1, 8, dtype=np.float32)[None]})["y"]
    print(json.dumps({"y": [round(float(v), 4) for v in y.ravel()]}))
""")


def _run_qnn(mode: str, tmp_path) -> subprocess.CompletedProcess:
    pytest.importorskip("onnxruntime_qnn")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(tmp_path / "q.onnx")],
                          check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "TargetUnavailableError" in proc.stderr:
        pytest.skip(f"no QNN device here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_qnn_session_prints_only_the_callers_json(tmp_path):
    proc = _run_qnn("guarded", tmp_path)
    assert json.loads(proc.stdout)["y"][-1] == pytest.approx(1.0, abs=0.03)
    assert proc.stdout.count("\n") == 1, proc.stdout


def test_without_the_guard_the_qnn_banner_reaches_stdout(tmp_path):
    """The reason for the guard: proves the test above would see the banner on stdout."""
    proc = _run_qnn("unguarded", tmp_path)
    if "LIBNATIVE" not in proc.stdout:
        pytest.skip("this QNN build prints nothing to stdout, even unguarded")
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)
