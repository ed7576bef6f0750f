// CUDA implementation of bertfast_C::linear_act (schema and semantics: csrc/linear_act.cpp): one cuBLASLt matmul
// with the bias / ReLU / GELU(tanh) epilogue fused into the GEMM (float32 GELU: the bias epilogue, then torch's
// GELU, for float32's accuracy; see linear_act_cuda).
//
// Layout: cuBLASLt is column-major. The row-major y [N, O] is the column-major y^T [O, N] (ld O), and
//   y^T = W x^T:  A = weight (row-major [O, K] = column-major [K, O], ld K) with op T,
//                 B = x      (row-major [N, K] = column-major [K, N], ld K) with op N,  m = O, n = N, k = K.
// The epilogue bias has m = O entries, added to every column of y^T, i.e. every row of y.
// fp16/bf16 accumulate in fp32 (CUBLAS_COMPUTE_32F); fp32 uses TF32 only when torch allows it
// (torch.backends.cuda.matmul.allow_tf32), like torch's own matmul.
// One cuBLASLt handle per device (created on first use); the workspace comes from torch's caching allocator on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>

#include "../checks.h"

namespace bertfast {
namespace cuda {
namespace {

constexpr const char* kOp = "bertfast_C::linear_act";
constexpr int64_t kWorkspaceBytes = 32 << 20;

#define BERTFAST_CUBLASLT_CHECK(expr)                                                                  \
  do {                                                                                                 \
    cublasStatus_t status_ = (expr);                                                                   \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, kOp, ": ", #expr, " failed: ",                      \
                cublasLtGetStatusString(status_), " (", static_cast<int>(status_), ")");              \
  } while (0)

cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::array<cublasLtHandle_t, 64> handles{};
  TORCH_CHECK(device >= 0 && device < 64, kOp, ": device index ", device, " out of the supported range");
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) BERTFAST_CUBLASLT_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

// RAII for the cuBLASLt descriptors.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

uint32_t alignment_of(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

cublasLtEpilogue_t parse_epilogue(const std::string& name) {
  if (name == "none") return CUBLASLT_EPILOGUE_DEFAULT;
  if (name == "bias") return CUBLASLT_EPILOGUE_BIAS;
  if (name == "bias_relu") return CUBLASLT_EPILOGUE_RELU_BIAS;
  if (name == "bias_gelu_tanh") return CUBLASLT_EPILOGUE_GELU_BIAS;
  TORCH_CHECK(false, kOp, ": epilogue must be one of \"none\", \"bias\", \"bias_relu\", \"bias_gelu_tanh\" "
              "(cuBLASLt's GELU is the tanh approximation); got \"", name, "\"");
}

// The same result from torch's GEMM and separate epilogue kernels: for K = 0 (an empty sum, which cuBLASLt does
// not take) and for the problems cuBLASLt's heuristic declines (torch's own addmm avoids cuBLASLt for some
// dimensions of 1 for that reason); the latter says so once.
at::Tensor composite(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     cublasLtEpilogue_t epi) {
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (epi == CUBLASLT_EPILOGUE_RELU_BIAS) y.relu_();
  if (epi == CUBLASLT_EPILOGUE_GELU_BIAS) y = at::gelu(y, "tanh");
  return y;
}

at::Tensor linear_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::string& epilogue) {
  const cublasLtEpilogue_t epi = parse_epilogue(epilogue);
  // cuBLASLt's GELU epilogue approximates tanh: in float32 it was 25x torch's error (6.8e-07 at y = -0.17, H200,
  // 2026-11-26), while its float16 / bfloat16 error stays within the output's rounding. A float32 output takes
  // the bias epilogue and torch's GELU over it instead, with float32's accuracy.
  const bool gelu_after = epi == CUBLASLT_EPILOGUE_GELU_BIAS && x.scalar_type() == at::kFloat;
  const cublasLtEpilogue_t lt_epi = gelu_after ? CUBLASLT_EPILOGUE_BIAS : epi;
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  check_float_dtype(kOp, "x", x);
  check_dim(kOp, "x", x, 2, "[N, K]");
  check_contiguous(kOp, "x", x);
  const int64_t n = x.size(0), k = x.size(1);
  check_device(kOp, "weight", weight, x.device());
  check_dtype(kOp, "weight", weight, x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k, kOp, ": weight must have shape [O, ", k,
              "] (nn.Linear's [out_features, in_features]), got ", weight.sizes());
  check_contiguous(kOp, "weight", weight);
  const int64_t o = weight.size(0);
  if (epi == CUBLASLT_EPILOGUE_DEFAULT) {
    TORCH_CHECK(!bias.has_value(), kOp, ": epilogue \"none\" takes no bias; use \"bias\"");
  } else {
    TORCH_CHECK(bias.has_value(), kOp, ": bias must be given for epilogue \"", epilogue, "\"");
    check_feature_vector(kOp, "bias", *bias, x, o);
  }
  for (int64_t v : {n, k, o}) {
    TORCH_CHECK(v <= INT32_MAX, kOp, ": dimensions must be < 2^31 for cuBLASLt, got x ", x.sizes(), " weight ",
                weight.sizes());
  }
  c10::cuda::CUDAGuard device_guard(x.device());
  if (n == 0 || o == 0) return at::empty({n, o}, x.options());
  if (k == 0) return composite(x, weight, bias, epi);  // an empty sum: the epilogue of zeros
  auto y = at::empty({n, o}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cublasLtHandle_t handle = handle_for(x.get_device());

  cudaDataType_t dt;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  switch (x.scalar_type()) {
    case at::kHalf: dt = CUDA_R_16F; break;
    case at::kBFloat16: dt = CUDA_R_16BF; break;
    default:
      dt = CUDA_R_32F;
      if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
  }
  Descriptors d;
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  BERTFAST_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  BERTFAST_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  BERTFAST_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &lt_epi, sizeof(lt_epi)));
  const void* bias_ptr = nullptr;
  at::Tensor bias_aligned;  // the epilogue reads the bias in wide loads: a view at an odd offset is copied
  if (bias.has_value()) {
    bias_aligned = alignment_of(bias->data_ptr()) >= 16 ? *bias : bias->clone();
    bias_ptr = bias_aligned.data_ptr();
    BERTFAST_CUBLASLT_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  }
  BERTFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.a, dt, k, o, k));  // weight: column-major [K, O]
  BERTFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.b, dt, k, n, k));  // x: column-major [K, N]
  BERTFAST_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d.c, dt, o, n, o));  // y: column-major [O, N]

  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  const uint64_t ws_bytes = kWorkspaceBytes;
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                               &ws_bytes, sizeof(ws_bytes)));
  const uint32_t align_a = alignment_of(weight.data_ptr()), align_b = alignment_of(x.data_ptr()),
                 align_c = alignment_of(y.data_ptr());
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                               &align_a, sizeof(align_a)));
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                               &align_b, sizeof(align_b)));
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                               &align_c, sizeof(align_c)));
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                               &align_c, sizeof(align_c)));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS || status == CUBLAS_STATUS_NOT_SUPPORTED, kOp,
              ": cublasLtMatmulAlgoGetHeuristic failed: ", cublasLtGetStatusString(status), " (",
              static_cast<int>(status), ")");
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || found == 0) {  // declined, not broken: any other status is an error
    TORCH_WARN_ONCE(kOp, ": cuBLASLt has no algorithm for x ", x.sizes(), " weight ", weight.sizes(), " ",
                    x.scalar_type(), " epilogue ", epilogue, " with pointer alignments (", align_b, ", ", align_a,
                    ", ", align_c, " bytes) (", cublasLtGetStatusString(status), "); computed with torch's GEMM "
                    "and a separate epilogue instead (said once)");
    return composite(x, weight, bias, epi);
  }
  auto workspace = at::empty({static_cast<int64_t>(heuristic.workspaceSize)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  BERTFAST_CUBLASLT_CHECK(cublasLtMatmul(handle, d.op, &alpha, weight.data_ptr(), d.a, x.data_ptr(), d.b, &beta,
                                         y.data_ptr(), d.c, y.data_ptr(), d.c, &heuristic.algo,
                                         workspace.numel() ? workspace.data_ptr() : nullptr,
                                         heuristic.workspaceSize, stream));
  if (gelu_after) at::gelu_(y, "tanh");
  return y;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bertfast_C, CUDA, m) { m.impl("linear_act", &cuda::linear_act_cuda); }

}  // namespace bertfast
