"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in the Triton interpreter on CPU tensors. TRITON_INTERPRET has to
be set before any @triton.jit function is defined, i.e. before bertfast.kernels is imported, so it is set here
at the very top. All caches are kept inside the project so nothing lands in the home directory.
"""
import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(_ROOT / ".cache" / "hf"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / ".cache" / "triton"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _patch_interpreter_bf16_dot():
    """The Triton 3.6 interpreter stores bf16 as uint16 and multiplies the raw bits in tl.dot (triton issue
    #11584). Upcast bf16 dot operands to fp32 first, which is what the tensor cores do anyway (bf16 products are
    exact in fp32). Also: fp32 operands of a "tf32" dot are truncated to tf32, as the tensor cores do."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_bertfast_bf16_patch", False):
        return
    original = builder.create_dot

    from triton._C.libtriton import ir
    tf32 = ir.INPUT_PRECISION.TF32

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == tf32 and a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32:
            # what the tensor cores do with fp32 operands of a tf32 dot: drop the low 13 mantissa bits (truncation;
            # a kernel that wants round-to-nearest rounds its operands itself). The interpreter multiplies in
            # exact fp32, which hid tf32's error from the tests
            def trunc(t):
                bits = np.ascontiguousarray(t.data, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
                return interp.TensorHandle(bits.view(np.float32), tl.float32)
            a, b = trunc(a), trunc(b)
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(t):
                if t.dtype.scalar == tl.bfloat16:
                    data = interp._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32)
                    return interp.TensorHandle(data, tl.float32)
                return t
            a, b = up(a), up(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._bertfast_bf16_patch = True


if not HAS_CUDA:
    _patch_interpreter_bf16_dot()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from a fixed seed so failures reproduce; tests that want fresh inputs per call draw
    them inside the test."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_report_header(config):
    if HAS_CUDA:
        return f"bertfast: CUDA device {torch.cuda.get_device_name()} - GPU tests run, Triton compiles for real"
    return "bertfast: no CUDA device - Triton kernels run in the interpreter (TRITON_INTERPRET=1); GPU-only tests are reported as skipped"


# tests that run on the GPU when there is one: those taking the `device` fixture (CUDA on a GPU machine), those
# with "cuda" in their name or parameters, the files that run on CUDA throughout, and tests marked gpu by hand.
# benchmarks/gpu_suite.sh runs them first (-m gpu), within its time budget, and the rest (which CI runs on CPU too)
# if time is left
_GPU_FILES = {"test_gpu_model.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        device_fixture = "device" in item.fixturenames and not (callspec and "device" in callspec.params)
        if device_fixture or "cuda" in item.name or item.path.name in _GPU_FILES:
            item.add_marker(pytest.mark.gpu)
