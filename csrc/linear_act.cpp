// bertfast_C::linear_act: GEMM + bias (+ activation) through cuBLASLt epilogues. CUDA only (csrc/cuda/linear_act.cu);
// the schema lives here so that it exists in every build, and a CPU call fails with the dispatcher's
// "could not run 'bertfast_C::linear_act' with arguments from the 'CPU' backend" (on CPU, torch's
// linear on MKL/oneDNN is the implementation). The encoder's FFN up-projection calls it through
// bertfast.ops.linear_act at inference where BERTFAST_LINEAR_EPILOGUE says so: by default where
// benchmarks/bench_linear_act.py measured it faster on a GPU of that name (bertfast/measured.py).
//
//   linear_act(Tensor x, Tensor weight, Tensor? bias, str epilogue) -> Tensor
//     x [N, K], weight [O, K] (nn.Linear's layout), bias [O] (required by every epilogue but "none"); one dtype of
//     float16 / bfloat16 / float32 (fp32 GEMMs in TF32 only when torch.backends.cuda.matmul.allow_tf32 is set,
//     as torch's own); all on one CUDA device, contiguous. Problems cuBLASLt declines run on torch's GEMM and
//     separate epilogue kernels (a warning says so once).
//     y [N, O] = epilogue(x @ weight^T + bias), x's dtype. epilogue: "none" (no bias), "bias", "bias_relu",
//     "bias_gelu_tanh" (cuBLASLt's GELU epilogue is the tanh approximation: use it only for gelu_new /
//     gelu_pytorch_tanh models; exact-erf GELU is bias_act's job). On CUDA a float32 output gets the bias
//     epilogue and torch's GELU after it: the fused epilogue's approximation is coarser than float32.
#include <torch/library.h>

namespace bertfast {

TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, str epilogue) -> Tensor");
}

}  // namespace bertfast
