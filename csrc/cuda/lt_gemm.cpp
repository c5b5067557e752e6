// cuBLASLt for the float GEMMs with few rows (lt_gemm.h). A plan (descriptors and the
// algorithm cuBLASLt's heuristic picks) is made once per shape, alignment, device and
// workspace size and kept per thread, so a step's call costs a hash lookup, not a heuristic
// query.
#include "lt_gemm.h"

#include <cublasLt.h>

#include <array>
#include <unordered_map>
#include <utility>
#include <vector>

#include "status.h"

namespace rnnext {
namespace cuda {
namespace {

// The largest of 16, 8 and 4 bytes that divides the address, for cuBLASLt's heuristic, which
// otherwise assumes 256-byte aligned operands. (torch's own cuBLASLt calls say up to 256: here
// a kernel that wants more than 16 is not considered.)
uint32_t alignment(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  for (uint32_t bytes : {16u, 8u}) {
    if (address % bytes == 0) return bytes;
  }
  return 4;
}

using PlanKey = std::array<int64_t, 11>;

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t hash = 0;
    for (int64_t v : key) hash = hash * 1000003u ^ std::hash<int64_t>{}(v);
    return hash;
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLAS's A (our B), B, C
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  bool usable = false;

  void release() {
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
    for (cublasLtMatrixLayout_t layout : {a, b, c}) {
      if (layout != nullptr) cublasLtMatrixLayoutDestroy(layout);
    }
  }
};

// One thread's cuBLASLt handles (one per device) and plans; released when the thread ends.
class Plans {
 public:
  ~Plans() {
    for (auto& [key, plan] : plans_) plan.release();
    for (auto& [device, handle] : handles_) {
      if (handle != nullptr) cublasLtDestroy(handle);
    }
  }

  // This thread's handle for `device`, or null where creating it failed (not retried).
  cublasLtHandle_t handle(int device) {
    for (auto& [d, handle] : handles_) {
      if (d == device) return handle;
    }
    cublasLtHandle_t handle = nullptr;
    if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) handle = nullptr;
    handles_.emplace_back(device, handle);
    return handle;
  }

  // The plan for `key`, made by make(plan) on first use. Shapes vary with the batch's active
  // rows and the operands' alignment, so a thread holds a few dozen per layer shape; past
  // kMaxPlans the cache starts again.
  template <typename Make>
  Plan& find(const PlanKey& key, const Make& make) {
    if (auto found = plans_.find(key); found != plans_.end()) return found->second;
    if (plans_.size() >= kMaxPlans) {
      for (auto& [old_key, plan] : plans_) plan.release();
      plans_.clear();
    }
    Plan& plan = plans_[key];
    make(plan);
    return plan;
  }

 private:
  static constexpr size_t kMaxPlans = 1024;
  std::vector<std::pair<int, cublasLtHandle_t>> handles_;
  std::unordered_map<PlanKey, Plan, PlanKeyHash> plans_;
};

thread_local Plans plans;

// Fills plan's descriptors and algorithm; leaves plan.usable false where any step fails.
void make_plan(Plan& plan, cublasLtHandle_t handle, int64_t M, int64_t N, int64_t K, int64_t lda,
               int64_t ldb, int64_t ldc, uint32_t align_a, uint32_t align_b, uint32_t align_c,
               size_t workspace_bytes) {
  // Column-major, as cuBLAS sees row-major C = A B^T: C^T[N, M] = B A^T, so cuBLAS's A is our
  // B ([N, K] row-major: K x N column-major, transposed) and its B our A (K x M, as it is).
  const cublasOperation_t op_a = CUBLAS_OP_T, op_b = CUBLAS_OP_N;
  const auto ok = [](cublasStatus_t status) { return status == CUBLAS_STATUS_SUCCESS; };
  if (!ok(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) ||
      !ok(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                         sizeof op_a)) ||
      !ok(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                         sizeof op_b)) ||
      !ok(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_32F, K, N, ldb)) ||
      !ok(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_32F, K, M, lda)) ||
      !ok(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, N, M, ldc))) {
    return;
  }
  cublasLtMatmulPreference_t preference = nullptr;
  if (!ok(cublasLtMatmulPreferenceCreate(&preference))) return;
  const uint64_t max_workspace = workspace_bytes;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const bool asked =
      ok(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &max_workspace, sizeof max_workspace)) &&
      ok(cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_b, sizeof align_b)) &&
      ok(cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_a, sizeof align_a)) &&
      ok(cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof align_c)) &&
      ok(cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof align_c)) &&
      ok(cublasLtMatmulAlgoGetHeuristic(handle, plan.op, plan.a, plan.b, plan.c, plan.c, preference,
                                        1, &result, &found));
  cublasLtMatmulPreferenceDestroy(preference);
  if (!asked || found < 1 || result.workspaceSize > workspace_bytes) return;
  plan.algo = result.algo;
  plan.workspace = result.workspaceSize;
  plan.usable = true;
}

}  // namespace

bool lt_gemm_applies(cublasHandle_t blas) {
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  check_blas(cublasGetMathMode(blas, &math), "get math mode");
  return (static_cast<int>(math) & 0xf) == CUBLAS_DEFAULT_MATH;
}

bool lt_gemm(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes, int64_t M,
             int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  cublasLtHandle_t handle = plans.handle(device);
  if (handle == nullptr) return false;
  const uint32_t align_a = alignment(A), align_b = alignment(B), align_c = alignment(C);
  const PlanKey key{device,
                    M,
                    N,
                    K,
                    lda,
                    ldb,
                    ldc,
                    align_a,
                    align_b,
                    align_c,
                    static_cast<int64_t>(workspace_bytes)};
  Plan& plan = plans.find(key, [&](Plan& p) {
    make_plan(p, handle, M, N, K, lda, ldb, ldc, align_a, align_b, align_c, workspace_bytes);
  });
  if (!plan.usable) return false;
  const float alpha = 1.f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, plan.op, &alpha, B, plan.a, A, plan.b, &beta, C, plan.c, C, plan.c,
                     &plan.algo, workspace, plan.workspace, stream);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) {
    plan.usable = false;  // refused before queuing anything: cuBLAS from now on for this shape
    return false;
  }
  check_blas(status, "cuBLASLt matmul");
  return true;
}

}  // namespace cuda
}  // namespace rnnext
