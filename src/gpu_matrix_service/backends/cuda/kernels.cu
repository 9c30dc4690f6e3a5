// The CUDA C half of the cuda backend, loaded from Python through ctypes (binding.py).
//
// Every exported function returns an int status: 0 on success, a cudaError_t value for a CUDA
// runtime error, GMS_CUBLAS_STATUS_BASE + cublasStatus_t for a cuBLAS error, or one of the
// GMS_ERR_* codes below. On failure it writes a readable message into the caller's buffer
// (err, errlen), so a failing call never aborts the process.
//
// Memory is owned by the caller: Python's pools hand in device buffers (cudaMalloc'd, reused
// across requests) and pinned host buffers. A DeviceContext owns what one device needs per
// request: three streams (copy-in, compute, copy-out), events, a pinned staging ring for
// pageable inputs and a cuBLAS handle. One request at a time runs on a context (its mutex).
//
// cuBLAS is opened with dlopen (gms_load_cublas) instead of linked: build machines often have
// nvcc without libcublas, and at run time cuBLAS may come from the nvidia-cublas wheel.

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <vector>

#define GMS_API extern "C" __attribute__((visibility("default")))

// Bumped whenever an exported signature changes; binding.py refuses a library of another ABI.
static const int kAbiVersion = 3;

enum : int {
  GMS_CUBLAS_STATUS_BASE = 10000,
  GMS_ERR_INVALID_ARGUMENT = 20001,
  GMS_ERR_CUBLAS_UNAVAILABLE = 20002,
  GMS_ERR_HOST_ALLOCATION = 20003,
  GMS_ERR_WRONG_RESULT = 20004,
};

enum Dtype : int { DT_FLOAT32 = 0, DT_FLOAT64 = 1, DT_INT32 = 2, DT_INT64 = 3 };
enum Op : int { OP_ADD = 0, OP_SUBTRACT = 1, OP_MULTIPLY = 2 };

static const int kMaxSlots = 3;       // chunks in flight per request (copy-in, compute, copy-out)
static const int kStagingBuffers = 4;  // pinned buffers that pageable inputs pass through
static const size_t kStagingBytes = 8u << 20;
static const int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Error reporting

static int report(char* err, size_t errlen, int code, const char* fmt, ...) {
  if (err != nullptr && errlen > 0) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(err, errlen, fmt, args);
    va_end(args);
  }
  return code;
}

static int report_cuda(cudaError_t e, const char* call, int line, char* err, size_t errlen) {
  return report(err, errlen, static_cast<int>(e), "%s failed: %s (%s) [kernels.cu:%d]", call,
                cudaGetErrorString(e), cudaGetErrorName(e), line);
}

#define CUDA_CHECK(call)                                                  \
  do {                                                                    \
    cudaError_t status_ = (call);                                         \
    if (status_ != cudaSuccess) {                                         \
      return report_cuda(status_, #call, __LINE__, err, errlen);          \
    }                                                                     \
  } while (0)

// The launch itself and then any error it left behind (bad configuration, missing image).
#define LAUNCH_CHECK(what) CUDA_CHECK((what, cudaGetLastError()))

// ---------------------------------------------------------------------------------------------
// cuBLAS through dlopen: the few entry points we call, with their C ABI spelled out here.

typedef int (*CublasCreate)(void**);
typedef int (*CublasDestroy)(void*);
typedef int (*CublasSetStream)(void*, cudaStream_t);
typedef int (*CublasSetMathMode)(void*, int);
typedef int (*CublasGetProperty)(int, int*);
typedef int (*CublasSgemm)(void*, int, int, int, int, int, const float*, const float*, int,
                           const float*, int, const float*, float*, int);
typedef int (*CublasDgemm)(void*, int, int, int, int, int, const double*, const double*, int,
                           const double*, int, const double*, double*, int);

static const int CUBLAS_OP_N = 0;
static const int CUBLAS_DEFAULT_MATH = 0;
static const int CUBLAS_TF32_TENSOR_OP_MATH = 3;

struct CublasApi {
  void* library = nullptr;
  int version = 0;
  CublasCreate create = nullptr;
  CublasDestroy destroy = nullptr;
  CublasSetStream set_stream = nullptr;
  CublasSetMathMode set_math_mode = nullptr;
  CublasSgemm sgemm = nullptr;
  CublasDgemm dgemm = nullptr;
};

static CublasApi g_cublas;
static std::mutex g_cublas_mutex;

static const char* cublas_status_name(int status) {
  switch (status) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

#define CUBLAS_CHECK(call)                                                                  \
  do {                                                                                      \
    int status_ = (call);                                                                   \
    if (status_ != 0) {                                                                     \
      return report(err, errlen, GMS_CUBLAS_STATUS_BASE + status_, "%s failed: %s [kernels.cu:%d]", \
                    #call, cublas_status_name(status_), __LINE__);                          \
    }                                                                                       \
  } while (0)

template <typename F>
static bool resolve(void* library, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(library, name));
  return *out != nullptr;
}

GMS_API int gms_load_cublas(const char* path, int* version, char* err, size_t errlen) {
  std::lock_guard<std::mutex> lock(g_cublas_mutex);
  if (g_cublas.library != nullptr) {
    *version = g_cublas.version;
    return 0;
  }
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* reason = dlerror();
    return report(err, errlen, GMS_ERR_CUBLAS_UNAVAILABLE, "dlopen(%s) failed: %s", path,
                  reason != nullptr ? reason : "unknown reason");
  }
  CublasApi api;
  CublasGetProperty get_property = nullptr;
  bool ok = resolve(library, "cublasCreate_v2", &api.create) &&
            resolve(library, "cublasDestroy_v2", &api.destroy) &&
            resolve(library, "cublasSetStream_v2", &api.set_stream) &&
            resolve(library, "cublasSetMathMode", &api.set_math_mode) &&
            resolve(library, "cublasSgemm_v2", &api.sgemm) &&
            resolve(library, "cublasDgemm_v2", &api.dgemm) &&
            resolve(library, "cublasGetProperty", &get_property);
  if (!ok) {
    dlclose(library);
    return report(err, errlen, GMS_ERR_CUBLAS_UNAVAILABLE, "%s lacks a cuBLAS v2 entry point",
                  path);
  }
  int major = 0, minor = 0, patch = 0;
  get_property(0, &major);
  get_property(1, &minor);
  get_property(2, &patch);
  api.library = library;
  api.version = major * 10000 + minor * 100 + patch;
  g_cublas = api;
  *version = api.version;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels

template <typename T> struct WrapType { typedef T type; };
// Integer arithmetic goes through unsigned types: it wraps around like NumPy's, where signed
// overflow would be undefined behaviour in C++.
template <> struct WrapType<int32_t> { typedef uint32_t type; };
template <> struct WrapType<int64_t> { typedef uint64_t type; };

template <int OpCode, typename T>
__device__ __forceinline__ T apply(T x, T y) {
  typedef typename WrapType<T>::type W;
  W a = static_cast<W>(x), b = static_cast<W>(y);
  if (OpCode == OP_ADD) return static_cast<T>(a + b);
  if (OpCode == OP_SUBTRACT) return static_cast<T>(a - b);
  return static_cast<T>(a * b);
}

// 16 bytes per load and store: whole 128-bit transactions, a quarter of the instructions.
template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

// out = a OP b, over n elements; all three 16-byte aligned (cudaMalloc'd, or pinned blocks).
// The pipeline computes in place (out == a); the zero-copy path reads and writes host memory.
template <int OpCode, typename T>
__global__ void elementwise(T* out, const T* a, const T* __restrict__ b, size_t n) {
  constexpr size_t kWidth = 16 / sizeof(T);
  const size_t packs = n / kWidth;
  const size_t first = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  Pack<T>* z = reinterpret_cast<Pack<T>*>(out);
  const Pack<T>* x = reinterpret_cast<const Pack<T>*>(a);
  const Pack<T>* y = reinterpret_cast<const Pack<T>*>(b);
  for (size_t i = first; i < packs; i += stride) {
    Pack<T> u = x[i];
    const Pack<T> v = y[i];
#pragma unroll
    for (size_t j = 0; j < kWidth; ++j) u.v[j] = apply<OpCode>(u.v[j], v.v[j]);
    z[i] = u;
  }
  const size_t tail = packs * kWidth + first;  // the last n % kWidth elements, one per thread
  if (tail < n) out[tail] = apply<OpCode>(a[tail], b[tail]);
}

template <int OpCode, typename T>
static void launch_elementwise(void* out, const void* a, const void* b, size_t n, int sm_count,
                               cudaStream_t stream) {
  const size_t packs = std::max<size_t>(n / (16 / sizeof(T)), 1);
  const size_t wanted = (packs + kThreads - 1) / kThreads;
  // A grid-stride loop over at most 8 blocks per SM: enough to keep every SM's loads in
  // flight, without a block per element for large chunks.
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>(wanted, size_t(sm_count) * 8));
  elementwise<OpCode, T><<<blocks, kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(a), static_cast<const T*>(b), n);
}

template <typename T>
static void launch_op(int op, void* out, const void* a, const void* b, size_t n, int sm_count,
                      cudaStream_t stream) {
  if (op == OP_ADD) launch_elementwise<OP_ADD, T>(out, a, b, n, sm_count, stream);
  if (op == OP_SUBTRACT) launch_elementwise<OP_SUBTRACT, T>(out, a, b, n, sm_count, stream);
  if (op == OP_MULTIPLY) launch_elementwise<OP_MULTIPLY, T>(out, a, b, n, sm_count, stream);
}

static void launch_dtype(int dtype, int op, void* out, const void* a, const void* b, size_t n,
                         int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case DT_FLOAT32: launch_op<float>(op, out, a, b, n, sm_count, stream); break;
    case DT_FLOAT64: launch_op<double>(op, out, a, b, n, sm_count, stream); break;
    case DT_INT32: launch_op<int32_t>(op, out, a, b, n, sm_count, stream); break;
    case DT_INT64: launch_op<int64_t>(op, out, a, b, n, sm_count, stream); break;
  }
}

static size_t dtype_size(int dtype) {
  switch (dtype) {
    case DT_FLOAT32: case DT_INT32: return 4;
    case DT_FLOAT64: case DT_INT64: return 8;
    default: return 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Device context: streams, events, staging ring and cuBLAS handle of one device

struct Slot {
  cudaEvent_t loaded = nullptr;    // inputs of the slot's chunk are on the device
  cudaEvent_t computed = nullptr;  // the kernel has written the slot's result
  cudaEvent_t drained = nullptr;   // the result is back on the host: the slot may be refilled
};

struct Staging {
  void* host = nullptr;
  cudaEvent_t copied = nullptr;  // the last copy out of this buffer has finished
};

// A kernel launched without waiting (gms_elementwise_launch), reported when it has finished.
struct Completion {
  uint64_t job;
  double seconds;  // from the launch call to the end of the kernel, host clock
  int status;      // cudaSuccess, or the device error the kernel (or one before it) met
};

struct DeviceContext;

struct LaunchedJob {
  DeviceContext* context;
  uint64_t job;
  std::chrono::steady_clock::time_point start;
};

struct DeviceContext {
  int ordinal = 0;
  int sm_count = 1;
  std::mutex mutex;
  cudaStream_t in = nullptr, compute = nullptr, out = nullptr;
  // Launched jobs: their own stream, finished ones queued for gms_take_completions, and an
  // eventfd that counts up for each, which the service's event loop watches.
  cudaStream_t launch = nullptr;
  int notify_fd = -1;
  std::mutex done_mutex;
  std::vector<Completion> done;
  Slot slots[kMaxSlots];
  Staging staging[kStagingBuffers];
  size_t next_staging = 0;
  std::vector<cudaEvent_t> timing;  // grows to the most chunks a request has had
  size_t next_timing = 0;
  void* cublas = nullptr;
};

static void destroy_context(DeviceContext* c) {
  cudaSetDevice(c->ordinal);
  for (cudaStream_t s : {c->in, c->compute, c->out, c->launch}) {
    if (s != nullptr) cudaStreamSynchronize(s);
  }
  if (c->cublas != nullptr) g_cublas.destroy(c->cublas);
  for (Slot& s : c->slots) {
    for (cudaEvent_t e : {s.loaded, s.computed, s.drained}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
  for (Staging& s : c->staging) {
    if (s.copied != nullptr) cudaEventDestroy(s.copied);
    if (s.host != nullptr) cudaFreeHost(s.host);
  }
  for (cudaEvent_t e : c->timing) cudaEventDestroy(e);
  for (cudaStream_t s : {c->in, c->compute, c->out, c->launch}) {
    if (s != nullptr) cudaStreamDestroy(s);
  }
  if (c->notify_fd >= 0) close(c->notify_fd);
  cudaGetLastError();  // leave no error of the teardown behind for this thread's next call
  delete c;
}

static int init_context(DeviceContext* c, char* err, size_t errlen) {
  CUDA_CHECK(cudaSetDevice(c->ordinal));
  CUDA_CHECK(cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, c->ordinal));
  // Non-blocking streams: no implicit waits on the legacy default stream other code may use.
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->in, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->compute, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->out, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c->launch, cudaStreamNonBlocking));
  c->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->notify_fd < 0) {
    return report(err, errlen, GMS_ERR_HOST_ALLOCATION, "eventfd failed: %s", strerror(errno));
  }
  for (Slot& s : c->slots) {
    CUDA_CHECK(cudaEventCreateWithFlags(&s.loaded, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&s.computed, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&s.drained, cudaEventDisableTiming));
  }
  for (Staging& s : c->staging) {
    CUDA_CHECK(cudaHostAlloc(&s.host, kStagingBytes, cudaHostAllocPortable));
    CUDA_CHECK(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
  }
  if (g_cublas.library != nullptr) {
    CUBLAS_CHECK(g_cublas.create(&c->cublas));
    CUBLAS_CHECK(g_cublas.set_stream(c->cublas, c->compute));
  }
  return 0;
}

GMS_API int gms_context_create(int ordinal, void** handle, char* err, size_t errlen) {
  DeviceContext* c = new DeviceContext();
  c->ordinal = ordinal;
  int status = init_context(c, err, errlen);
  if (status != 0) {
    destroy_context(c);
    return status;
  }
  *handle = c;
  return 0;
}

GMS_API int gms_context_destroy(void* handle, char* err, size_t errlen) {
  if (handle == nullptr) return report(err, errlen, GMS_ERR_INVALID_ARGUMENT, "null context");
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  { std::lock_guard<std::mutex> lock(c->mutex); }  // wait for a request still running
  destroy_context(c);
  return 0;
}

GMS_API int gms_context_has_cublas(void* handle) {
  return static_cast<DeviceContext*>(handle)->cublas != nullptr ? 1 : 0;
}

// Timing events come in (start, end) pairs; the pool of them grows and is reused.
static int timing_pair(DeviceContext* c, cudaEvent_t* start, cudaEvent_t* end, char* err,
                       size_t errlen) {
  while (c->timing.size() < c->next_timing + 2) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    c->timing.push_back(e);
  }
  *start = c->timing[c->next_timing++];
  *end = c->timing[c->next_timing++];
  return 0;
}

struct Interval {
  cudaEvent_t start, end;
};

struct PhaseTimes {
  std::vector<Interval> h2d, kernel, d2h;
  Interval total;
};

static int phase_begin(DeviceContext* c, std::vector<Interval>* phase, cudaStream_t stream,
                 char* err, size_t errlen) {
  Interval i;
  int status = timing_pair(c, &i.start, &i.end, err, errlen);
  if (status != 0) return status;
  CUDA_CHECK(cudaEventRecord(i.start, stream));
  phase->push_back(i);
  return 0;
}

static int phase_end(std::vector<Interval>* phase, cudaStream_t stream, char* err, size_t errlen) {
  CUDA_CHECK(cudaEventRecord(phase->back().end, stream));
  return 0;
}

static int sum_seconds(const std::vector<Interval>& phase, double* seconds, char* err,
                       size_t errlen) {
  double total_ms = 0.0;
  for (const Interval& i : phase) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, i.start, i.end));
    total_ms += ms;
  }
  *seconds = total_ms / 1000.0;
  return 0;
}

// timings[0..3] = h2d, kernel, d2h (busy time of each phase, summed over chunks) and total
// (first copy in to last copy out), all in seconds.
static int read_timings(const PhaseTimes& t, double* timings, char* err, size_t errlen) {
  int status = sum_seconds(t.h2d, &timings[0], err, errlen);
  if (status == 0) status = sum_seconds(t.kernel, &timings[1], err, errlen);
  if (status == 0) status = sum_seconds(t.d2h, &timings[2], err, errlen);
  if (status == 0) status = sum_seconds({t.total}, &timings[3], err, errlen);
  return status;
}

static bool is_pinned(const void* p) {
  cudaPointerAttributes attributes;
  if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
    cudaGetLastError();  // plain pageable memory is not an error worth keeping
    return false;
  }
  return attributes.type == cudaMemoryTypeHost;
}

// Host to device on the copy-in stream. Pinned sources go straight to the copy engine;
// pageable ones pass through the pinned staging ring, so the CPU copy of one piece overlaps
// the DMA of the previous one (a pageable cudaMemcpy would stage it serially, at about a
// sixth of the pinned bandwidth).
static int upload(DeviceContext* c, void* dst, const void* src, size_t bytes, bool pinned,
                  char* err, size_t errlen) {
  if (pinned) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->in));
    return 0;
  }
  for (size_t offset = 0; offset < bytes; offset += kStagingBytes) {
    const size_t piece = std::min(kStagingBytes, bytes - offset);
    Staging& s = c->staging[c->next_staging++ % kStagingBuffers];
    CUDA_CHECK(cudaEventSynchronize(s.copied));
    memcpy(s.host, static_cast<const char*>(src) + offset, piece);
    CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + offset, s.host, piece,
                               cudaMemcpyHostToDevice, c->in));
    CUDA_CHECK(cudaEventRecord(s.copied, c->in));
  }
  return 0;
}

#define TRY(call)                      \
  do {                                 \
    int status_ = (call);              \
    if (status_ != 0) return status_;  \
  } while (0)

// Wait for `streams`, whatever happened: buffers go back to Python's pools after this, so no
// copy or kernel may still be using them. The first error is the one reported.
static int finish_streams(DeviceContext* c, std::initializer_list<cudaStream_t> streams,
                          int status, char* err, size_t errlen) {
  for (cudaStream_t s : streams) {
    cudaError_t e = cudaStreamSynchronize(s);
    if (e != cudaSuccess && status == 0) {
      status = report_cuda(e, "cudaStreamSynchronize", __LINE__, err, errlen);
    }
  }
  if (status != 0) cudaGetLastError();
  return status;
}

// A request's end: all three streams. Every entry point but the zero-copy one must end with it,
// error paths included: the zero-copy path then synchronizes only its compute stream and uses
// the staging buffers without waiting for their copy events.
static int finish_request(DeviceContext* c, int status, char* err, size_t errlen) {
  return finish_streams(c, {c->in, c->compute, c->out}, status, err, errlen);
}

// ---------------------------------------------------------------------------------------------
// Requests

// The chunk pipeline: chunk j uses slot j % slots; its inputs are copied in on `in`, computed
// in place on `compute`, and copied out on `out`, so chunk j+1's copy in, chunk j's kernel and
// chunk j-1's copy out run at once (PCIe and NVLink-C2C are full duplex).
static int elementwise_pipeline(DeviceContext* c, int op, int dtype, const char* a,
                                const char* b, char* out, size_t n, size_t chunk_elems,
                                void* const* buffers, int slots, double* timings, char* err,
                                size_t errlen) {
  const size_t elem = dtype_size(dtype);
  const bool a_pinned = is_pinned(a), b_pinned = is_pinned(b);
  PhaseTimes t;
  c->next_timing = 0;
  TRY(timing_pair(c, &t.total.start, &t.total.end, err, errlen));
  CUDA_CHECK(cudaEventRecord(t.total.start, c->in));
  const size_t chunks = (n + chunk_elems - 1) / chunk_elems;
  for (size_t j = 0; j < chunks; ++j) {
    Slot& slot = c->slots[j % slots];
    void* dev_a = buffers[2 * (j % slots)];
    void* dev_b = buffers[2 * (j % slots) + 1];
    const size_t first = j * chunk_elems;
    const size_t count = std::min(chunk_elems, n - first);
    const size_t offset = first * elem, bytes = count * elem;
    if (j >= static_cast<size_t>(slots)) CUDA_CHECK(cudaStreamWaitEvent(c->in, slot.drained, 0));
    TRY(phase_begin(c, &t.h2d, c->in, err, errlen));
    TRY(upload(c, dev_a, a + offset, bytes, a_pinned, err, errlen));
    TRY(upload(c, dev_b, b + offset, bytes, b_pinned, err, errlen));
    TRY(phase_end(&t.h2d, c->in, err, errlen));
    CUDA_CHECK(cudaEventRecord(slot.loaded, c->in));

    CUDA_CHECK(cudaStreamWaitEvent(c->compute, slot.loaded, 0));
    TRY(phase_begin(c, &t.kernel, c->compute, err, errlen));
    LAUNCH_CHECK(launch_dtype(dtype, op, dev_a, dev_a, dev_b, count, c->sm_count, c->compute));
    TRY(phase_end(&t.kernel, c->compute, err, errlen));
    CUDA_CHECK(cudaEventRecord(slot.computed, c->compute));

    CUDA_CHECK(cudaStreamWaitEvent(c->out, slot.computed, 0));
    TRY(phase_begin(c, &t.d2h, c->out, err, errlen));
    CUDA_CHECK(cudaMemcpyAsync(out + offset, dev_a, bytes, cudaMemcpyDeviceToHost, c->out));
    TRY(phase_end(&t.d2h, c->out, err, errlen));
    CUDA_CHECK(cudaEventRecord(slot.drained, c->out));
  }
  CUDA_CHECK(cudaEventRecord(t.total.end, c->out));
  CUDA_CHECK(cudaStreamSynchronize(c->out));
  return read_timings(t, timings, err, errlen);
}

// out = a OP b over n elements of dtype. `buffers` holds 2 * slots device buffers (a0, b0,
// a1, b1, ...), each at least chunk_elems elements and 16-byte aligned.
GMS_API int gms_elementwise(void* handle, int op, int dtype, const void* a, const void* b,
                            void* out, size_t n, size_t chunk_elems, void* const* buffers,
                            int slots, double* timings, char* err, size_t errlen) {
  if (handle == nullptr || op < OP_ADD || op > OP_MULTIPLY || dtype_size(dtype) == 0 ||
      n == 0 || chunk_elems == 0 || slots < 1 || slots > kMaxSlots) {
    return report(err, errlen, GMS_ERR_INVALID_ARGUMENT,
                  "gms_elementwise: bad arguments (op %d, dtype %d, n %zu, chunk %zu, slots %d)",
                  op, dtype, n, chunk_elems, slots);
  }
  for (int i = 0; i < 2 * slots; ++i) {
    if (reinterpret_cast<uintptr_t>(buffers[i]) % 16 != 0) {
      return report(err, errlen, GMS_ERR_INVALID_ARGUMENT, "device buffer %d not 16-byte aligned",
                    i);
    }
  }
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  std::lock_guard<std::mutex> lock(c->mutex);
  CUDA_CHECK(cudaSetDevice(c->ordinal));
  cudaGetLastError();
  int status = elementwise_pipeline(c, op, dtype, static_cast<const char*>(a),
                                    static_cast<const char*>(b), static_cast<char*>(out), n,
                                    chunk_elems, buffers, slots, timings, err, errlen);
  return finish_request(c, status, err, errlen);
}

// The arguments of an elementwise request small enough for the staging buffers (zero-copy or
// launched): 0, or GMS_ERR_INVALID_ARGUMENT naming `function`. n is checked before it is
// multiplied: a huge n must not wrap around to a small size.
static int check_small_elementwise(const char* function, void* handle, int op, int dtype,
                                   size_t n, char* err, size_t errlen) {
  const size_t elem = dtype_size(dtype);
  if (handle == nullptr || op < OP_ADD || op > OP_MULTIPLY || elem == 0 || n == 0 ||
      n > kStagingBytes / elem) {
    return report(err, errlen, GMS_ERR_INVALID_ARGUMENT,
                  "%s: bad arguments (op %d, dtype %d, n %zu)", function, op, dtype, n);
  }
  return 0;
}

// Where the kernel can reach host memory `p` of `bytes` bytes: `p` itself when it is pinned
// (with unified addressing a pinned pointer is valid on the device) and 16-byte aligned, else
// the staging buffer `s`, into which `p`'s bytes are copied first when `copy_in`.
static const void* reachable(const void* p, size_t bytes, Staging& s, bool copy_in) {
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0 && is_pinned(p)) return p;
  if (copy_in) memcpy(s.host, p, bytes);
  return s.host;
}

// out = a OP b over n elements (n * dtype size at most kStagingBytes), the kernel reading a
// and b from host memory and writing out there itself. For small operands this "zero copy"
// saves the pipeline's fixed costs: two copies in, one out, their events and the hand-offs
// between three streams (docs/cuda-backend.md). timings as gms_elementwise's, timed on the
// host: the copies are inside the kernel (h2d and d2h 0).
GMS_API int gms_elementwise_zero_copy(void* handle, int op, int dtype, const void* a,
                                      const void* b, void* out, size_t n, double* timings,
                                      char* err, size_t errlen) {
  TRY(check_small_elementwise("gms_elementwise_zero_copy", handle, op, dtype, n, err, errlen));
  const size_t bytes = n * dtype_size(dtype);
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  std::lock_guard<std::mutex> lock(c->mutex);
  CUDA_CHECK(cudaSetDevice(c->ordinal));
  cudaGetLastError();
  const auto start = std::chrono::steady_clock::now();
  // The staging buffers and copy streams are idle: every other request ends with
  // finish_request, and this one queues work on the compute stream only.
  const void* dev_a = reachable(a, bytes, c->staging[0], true);
  const void* dev_b = reachable(b, bytes, c->staging[1], true);
  void* dev_out = const_cast<void*>(reachable(out, bytes, c->staging[2], false));
  cudaError_t e = (launch_dtype(dtype, op, dev_out, dev_a, dev_b, n, c->sm_count, c->compute),
                   cudaGetLastError());
  int status = e == cudaSuccess ? 0 : report_cuda(e, "elementwise kernel", __LINE__, err, errlen);
  // Only the compute stream has work: the copy streams are idle between requests, and each
  // idle stream's synchronize is a driver call on the event loop's thread.
  status = finish_streams(c, {c->compute}, status, err, errlen);
  if (status != 0) return status;
  if (dev_out != out) memcpy(out, dev_out, bytes);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  timings[0] = 0.0;
  timings[1] = seconds;
  timings[2] = 0.0;
  timings[3] = seconds;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Launched jobs: a small elementwise request started without waiting for it
//
// The caller's thread (the service's event loop) only launches: the kernel reads a and b from
// pinned host memory and writes out there, on the context's launch stream, and a stream
// callback queued behind it reports the job to the context's completion queue and counts the
// eventfd up. The loop wakes on the eventfd and takes the finished jobs (gms_take_completions),
// so the GPU's round trip (15-38 us on H200 machines, docs/benchmarks.md) overlaps other
// requests' work instead of holding the loop. cudaStreamAddCallback rather than
// cudaLaunchHostFunc: a host function is never called once the context has met a device
// error, which would leave its request waiting for the compute timeout and its admission
// place and arrays held for good; a stream callback is called exactly once, with the error.
// It may not call CUDA; this one only locks, appends and writes.

static void CUDART_CB report_job_done(cudaStream_t, cudaError_t status, void* data) {
  LaunchedJob* job = static_cast<LaunchedJob*>(data);
  DeviceContext* c = job->context;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - job->start).count();
  {
    std::lock_guard<std::mutex> lock(c->done_mutex);
    c->done.push_back(Completion{job->job, seconds, static_cast<int>(status)});
  }
  delete job;
  const uint64_t one = 1;
  // Cannot fail short of a counter at 2^64 - 1: the loop reads (resets) it on every wake.
  (void)!write(c->notify_fd, &one, sizeof one);
}

// out = a OP b over n elements, launched on the context's launch stream; returns at once and
// reports `job` through gms_take_completions when done. a, b and out must be pinned and
// 16-byte aligned (GMS_ERR_INVALID_ARGUMENT otherwise: nothing is staged here), and must stay
// untouched until the job is reported.
GMS_API int gms_elementwise_launch(void* handle, int op, int dtype, const void* a, const void* b,
                                   void* out, size_t n, uint64_t job, char* err, size_t errlen) {
  TRY(check_small_elementwise("gms_elementwise_launch", handle, op, dtype, n, err, errlen));
  for (const void* p : {a, b, static_cast<const void*>(out)}) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !is_pinned(p)) {
      return report(err, errlen, GMS_ERR_INVALID_ARGUMENT,
                    "gms_elementwise_launch: operands must be pinned and 16-byte aligned");
    }
  }
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  std::lock_guard<std::mutex> lock(c->mutex);
  CUDA_CHECK(cudaSetDevice(c->ordinal));
  cudaGetLastError();
  LaunchedJob* launched = new LaunchedJob{c, job, std::chrono::steady_clock::now()};
  cudaError_t e = (launch_dtype(dtype, op, out, a, b, n, c->sm_count, c->launch),
                   cudaGetLastError());
  if (e == cudaSuccess) e = cudaStreamAddCallback(c->launch, report_job_done, launched, 0);
  if (e != cudaSuccess) {
    delete launched;
    // The kernel may be queued: the caller reuses the arrays once this returns, so wait.
    cudaStreamSynchronize(c->launch);
    cudaGetLastError();
    return report_cuda(e, "gms_elementwise_launch", __LINE__, err, errlen);
  }
  return 0;
}

// The name and text of a CUDA error code (a launched job's status), e.g. for a log line.
GMS_API const char* gms_cuda_error_text(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

// The eventfd that counts up once per finished launched job (the caller reads it to reset it).
GMS_API int gms_context_notify_fd(void* handle) {
  return static_cast<DeviceContext*>(handle)->notify_fd;
}

// Moves up to `most` finished jobs, oldest first, into jobs[], seconds[] and statuses[]
// (0, or the CUDA error the job met); returns how many.
GMS_API size_t gms_take_completions(void* handle, uint64_t* jobs, double* seconds,
                                    int* statuses, size_t most) {
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  std::lock_guard<std::mutex> lock(c->done_mutex);
  const size_t taken = std::min(most, c->done.size());
  for (size_t i = 0; i < taken; ++i) {
    jobs[i] = c->done[i].job;
    seconds[i] = c->done[i].seconds;
    statuses[i] = c->done[i].status;
  }
  c->done.erase(c->done.begin(), c->done.begin() + static_cast<std::ptrdiff_t>(taken));
  return taken;
}

// Row-major C (m x n) = A (m x k) B (k x n) is column-major C^T = B^T A^T, which is what cuBLAS
// computes here without any transpose. Rows of A and C are processed in blocks so that block
// j's product overlaps block j+1's copy in and block j-1's copy out.
static int gemm_block(void* cublas, int dtype, const char* dev_a, const char* dev_b,
                      char* dev_c, int rows, int k, int n, char* err, size_t errlen) {
  if (dtype == DT_FLOAT32) {
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(g_cublas.sgemm(cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, rows, k, &one,
                                reinterpret_cast<const float*>(dev_b), n,
                                reinterpret_cast<const float*>(dev_a), k, &zero,
                                reinterpret_cast<float*>(dev_c), n));
  } else {
    const double one = 1.0, zero = 0.0;
    CUBLAS_CHECK(g_cublas.dgemm(cublas, CUBLAS_OP_N, CUBLAS_OP_N, n, rows, k, &one,
                                reinterpret_cast<const double*>(dev_b), n,
                                reinterpret_cast<const double*>(dev_a), k, &zero,
                                reinterpret_cast<double*>(dev_c), n));
  }
  return 0;
}

static int matmul_pipeline(DeviceContext* c, int dtype, int allow_tf32, const char* a,
                           const char* b, char* out, size_t m, size_t k, size_t n,
                           size_t block_rows, char* dev_a, char* dev_b, char* dev_c,
                           double* timings, char* err, size_t errlen) {
  const size_t elem = dtype_size(dtype);
  const int math = (dtype == DT_FLOAT32 && allow_tf32) ? CUBLAS_TF32_TENSOR_OP_MATH
                                                       : CUBLAS_DEFAULT_MATH;
  CUBLAS_CHECK(g_cublas.set_math_mode(c->cublas, math));
  const bool a_pinned = is_pinned(a), b_pinned = is_pinned(b);
  PhaseTimes t;
  c->next_timing = 0;
  TRY(timing_pair(c, &t.total.start, &t.total.end, err, errlen));
  CUDA_CHECK(cudaEventRecord(t.total.start, c->in));
  TRY(phase_begin(c, &t.h2d, c->in, err, errlen));
  TRY(upload(c, dev_b, b, k * n * elem, b_pinned, err, errlen));
  TRY(phase_end(&t.h2d, c->in, err, errlen));
  const size_t blocks = (m + block_rows - 1) / block_rows;
  for (size_t j = 0; j < blocks; ++j) {
    Slot& slot = c->slots[j % kMaxSlots];
    const size_t row = j * block_rows, rows = std::min(block_rows, m - row);
    TRY(phase_begin(c, &t.h2d, c->in, err, errlen));
    TRY(upload(c, dev_a + row * k * elem, a + row * k * elem, rows * k * elem, a_pinned, err,
               errlen));
    TRY(phase_end(&t.h2d, c->in, err, errlen));
    CUDA_CHECK(cudaEventRecord(slot.loaded, c->in));

    CUDA_CHECK(cudaStreamWaitEvent(c->compute, slot.loaded, 0));
    TRY(phase_begin(c, &t.kernel, c->compute, err, errlen));
    TRY(gemm_block(c->cublas, dtype, dev_a + row * k * elem, dev_b, dev_c + row * n * elem,
                   static_cast<int>(rows), static_cast<int>(k), static_cast<int>(n), err,
                   errlen));
    TRY(phase_end(&t.kernel, c->compute, err, errlen));
    CUDA_CHECK(cudaEventRecord(slot.computed, c->compute));

    CUDA_CHECK(cudaStreamWaitEvent(c->out, slot.computed, 0));
    TRY(phase_begin(c, &t.d2h, c->out, err, errlen));
    CUDA_CHECK(cudaMemcpyAsync(out + row * n * elem, dev_c + row * n * elem, rows * n * elem,
                               cudaMemcpyDeviceToHost, c->out));
    TRY(phase_end(&t.d2h, c->out, err, errlen));
  }
  CUDA_CHECK(cudaEventRecord(t.total.end, c->out));
  CUDA_CHECK(cudaStreamSynchronize(c->out));
  return read_timings(t, timings, err, errlen);
}

// out (m x n) = a (m x k) @ b (k x n), row-major float32 or float64. dev_a, dev_b and dev_c
// hold m*k, k*n and m*n elements. TF32 tensor cores only when allow_tf32 (float32).
GMS_API int gms_matmul(void* handle, int dtype, int allow_tf32, const void* a, const void* b,
                       void* out, size_t m, size_t k, size_t n, size_t block_rows, void* dev_a,
                       void* dev_b, void* dev_c, double* timings, char* err, size_t errlen) {
  const size_t int_max = 2147483647u;
  if (handle == nullptr || (dtype != DT_FLOAT32 && dtype != DT_FLOAT64) || m == 0 || k == 0 ||
      n == 0 || m > int_max || k > int_max || n > int_max || block_rows == 0) {
    return report(err, errlen, GMS_ERR_INVALID_ARGUMENT,
                  "gms_matmul: bad arguments (dtype %d, m %zu, k %zu, n %zu, block rows %zu)",
                  dtype, m, k, n, block_rows);
  }
  DeviceContext* c = static_cast<DeviceContext*>(handle);
  if (c->cublas == nullptr) {
    return report(err, errlen, GMS_ERR_CUBLAS_UNAVAILABLE, "cuBLAS is not loaded");
  }
  std::lock_guard<std::mutex> lock(c->mutex);
  CUDA_CHECK(cudaSetDevice(c->ordinal));
  cudaGetLastError();
  int status = matmul_pipeline(c, dtype, allow_tf32, static_cast<const char*>(a),
                               static_cast<const char*>(b), static_cast<char*>(out), m, k, n,
                               block_rows, static_cast<char*>(dev_a), static_cast<char*>(dev_b),
                               static_cast<char*>(dev_c), timings, err, errlen);
  return finish_request(c, status, err, errlen);
}

// ---------------------------------------------------------------------------------------------
// Devices and memory

GMS_API int gms_abi_version(void) { return kAbiVersion; }

GMS_API int gms_runtime_info(int* runtime_version, int* driver_version, char* err,
                             size_t errlen) {
  CUDA_CHECK(cudaRuntimeGetVersion(runtime_version));
  CUDA_CHECK(cudaDriverGetVersion(driver_version));
  return 0;
}

GMS_API int gms_device_count(int* count, char* err, size_t errlen) {
  CUDA_CHECK(cudaGetDeviceCount(count));
  return 0;
}

// name (NUL-terminated, truncated to name_len), total memory in bytes, SM count, capability.
GMS_API int gms_device_info(int ordinal, char* name, size_t name_len, size_t* total_bytes,
                            int* sm_count, int* major, int* minor, char* err, size_t errlen) {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, ordinal));
  snprintf(name, name_len, "%s", prop.name);
  *total_bytes = prop.totalGlobalMem;
  *sm_count = prop.multiProcessorCount;
  *major = prop.major;
  *minor = prop.minor;
  return 0;
}

GMS_API int gms_mem_info(int ordinal, size_t* free_bytes, size_t* total_bytes, char* err,
                         size_t errlen) {
  CUDA_CHECK(cudaSetDevice(ordinal));
  CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
  return 0;
}

GMS_API int gms_device_alloc(int ordinal, size_t bytes, void** ptr, char* err, size_t errlen) {
  CUDA_CHECK(cudaSetDevice(ordinal));
  cudaError_t e = cudaMalloc(ptr, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // out of memory is not sticky: clear it for this thread's next call
    return report(err, errlen, static_cast<int>(e),
                  "cudaMalloc(%zu bytes) on cuda:%d failed: %s (%s)", bytes, ordinal,
                  cudaGetErrorString(e), cudaGetErrorName(e));
  }
  return 0;
}

GMS_API int gms_device_free(int ordinal, void* ptr, char* err, size_t errlen) {
  CUDA_CHECK(cudaSetDevice(ordinal));
  CUDA_CHECK(cudaFree(ptr));
  return 0;
}

// Page-locked host memory usable by every device (portable), for DMA without staging.
GMS_API int gms_host_alloc(size_t bytes, void** ptr, char* err, size_t errlen) {
  cudaError_t e = cudaHostAlloc(ptr, bytes, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return report(err, errlen, static_cast<int>(e), "cudaHostAlloc(%zu bytes) failed: %s (%s)",
                  bytes, cudaGetErrorString(e), cudaGetErrorName(e));
  }
  return 0;
}

GMS_API int gms_host_free(void* ptr, char* err, size_t errlen) {
  CUDA_CHECK(cudaFreeHost(ptr));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Benchmark helpers: the lab's naive add, and the machine's ceilings

__global__ void naive_add_kernel(const float* a, const float* b, float* out, int rows,
                                 int cols) {
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (row < rows && col < cols) out[row * cols + col] = a[row * cols + col] + b[row * cols + col];
}

static int naive_add_body(const float* a, const float* b, float* out, int rows, int cols,
                          float** dev, char* err, size_t errlen) {
  const size_t bytes = size_t(rows) * cols * sizeof(float);
  for (int i = 0; i < 3; ++i) CUDA_CHECK(cudaMalloc(&dev[i], bytes));
  CUDA_CHECK(cudaMemcpy(dev[0], a, bytes, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dev[1], b, bytes, cudaMemcpyHostToDevice));
  const dim3 threads(16, 16);
  const dim3 blocks((cols + 15) / 16, (rows + 15) / 16);
  LAUNCH_CHECK((naive_add_kernel<<<blocks, threads>>>(dev[0], dev[1], dev[2], rows, cols)));
  CUDA_CHECK(cudaMemcpy(out, dev[2], bytes, cudaMemcpyDeviceToHost));
  return 0;
}

// What the lab's service did per request: cudaMalloc, pageable cudaMemcpy, 16x16 blocks,
// cudaFree. *seconds is its host wall time.
GMS_API int gms_naive_add(int ordinal, const float* a, const float* b, float* out, int rows,
                          int cols, double* seconds, char* err, size_t errlen) {
  CUDA_CHECK(cudaSetDevice(ordinal));
  const auto start = std::chrono::steady_clock::now();
  float* dev[3] = {nullptr, nullptr, nullptr};
  int status = naive_add_body(a, b, out, rows, cols, dev, err, errlen);
  for (float* p : dev) {
    if (p != nullptr) cudaFree(p);
  }
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return status;
}

enum CopyKind : int {
  COPY_H2D = 0, COPY_D2H = 1, COPY_BOTH = 2, COPY_D2D = 3, COPY_H2D_PAGEABLE = 4,
  COPY_D2H_PAGEABLE = 5,
};

struct CopyBench {
  void* host[2] = {nullptr, nullptr};
  bool pinned = true;
  void* dev[2] = {nullptr, nullptr};
  cudaStream_t stream[2] = {nullptr, nullptr};
  cudaEvent_t start = nullptr, stop = nullptr, joined = nullptr;
};

static int copy_once(CopyBench& s, int kind, size_t bytes, char* err, size_t errlen) {
  switch (kind) {
    case COPY_H2D: case COPY_H2D_PAGEABLE:
      CUDA_CHECK(cudaMemcpyAsync(s.dev[0], s.host[0], bytes, cudaMemcpyHostToDevice, s.stream[0]));
      break;
    case COPY_D2H: case COPY_D2H_PAGEABLE:
      CUDA_CHECK(cudaMemcpyAsync(s.host[0], s.dev[0], bytes, cudaMemcpyDeviceToHost, s.stream[0]));
      break;
    case COPY_BOTH:
      CUDA_CHECK(cudaStreamWaitEvent(s.stream[1], s.start, 0));
      CUDA_CHECK(cudaMemcpyAsync(s.dev[0], s.host[0], bytes, cudaMemcpyHostToDevice, s.stream[0]));
      CUDA_CHECK(cudaMemcpyAsync(s.host[1], s.dev[1], bytes, cudaMemcpyDeviceToHost, s.stream[1]));
      CUDA_CHECK(cudaEventRecord(s.joined, s.stream[1]));
      CUDA_CHECK(cudaStreamWaitEvent(s.stream[0], s.joined, 0));
      break;
    default:
      CUDA_CHECK(cudaMemcpyAsync(s.dev[1], s.dev[0], bytes, cudaMemcpyDeviceToDevice, s.stream[0]));
  }
  return 0;
}

static int copy_bench_body(CopyBench& s, int kind, size_t bytes, int iterations,
                           double* seconds, char* err, size_t errlen) {
  s.pinned = kind != COPY_H2D_PAGEABLE && kind != COPY_D2H_PAGEABLE;
  for (int i = 0; i < 2; ++i) {
    if (s.pinned) {
      CUDA_CHECK(cudaHostAlloc(&s.host[i], bytes, cudaHostAllocPortable));
    } else if ((s.host[i] = malloc(bytes)) == nullptr) {
      return report(err, errlen, GMS_ERR_HOST_ALLOCATION, "malloc(%zu) failed", bytes);
    }
    memset(s.host[i], 0x5a, bytes);  // touch every page: first-touch faults are not copy time
    CUDA_CHECK(cudaMalloc(&s.dev[i], bytes));
    CUDA_CHECK(cudaMemset(s.dev[i], 0x3c, bytes));
    CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream[i], cudaStreamNonBlocking));
  }
  CUDA_CHECK(cudaEventCreate(&s.start));
  CUDA_CHECK(cudaEventCreate(&s.stop));
  CUDA_CHECK(cudaEventCreateWithFlags(&s.joined, cudaEventDisableTiming));
  for (int i = -1; i < iterations; ++i) {  // i == -1 warms up
    CUDA_CHECK(cudaEventRecord(s.start, s.stream[0]));
    TRY(copy_once(s, kind, bytes, err, errlen));
    CUDA_CHECK(cudaEventRecord(s.stop, s.stream[0]));
    CUDA_CHECK(cudaEventSynchronize(s.stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, s.start, s.stop));
    if (i >= 0) seconds[i] = ms / 1000.0;
  }
  return 0;
}

// seconds[i] = duration of copy i of `bytes` (kind: 0 H2D, 1 D2H, 2 both directions at once,
// 3 device to device, 4 pageable H2D, 5 pageable D2H), after one warm-up copy.
GMS_API int gms_bench_copy(int ordinal, int kind, size_t bytes, int iterations, double* seconds,
                           char* err, size_t errlen) {
  if (kind < COPY_H2D || kind > COPY_D2H_PAGEABLE || bytes == 0 || iterations < 1) {
    return report(err, errlen, GMS_ERR_INVALID_ARGUMENT, "gms_bench_copy: bad arguments");
  }
  CUDA_CHECK(cudaSetDevice(ordinal));
  CopyBench s;
  int status = copy_bench_body(s, kind, bytes, iterations, seconds, err, errlen);
  for (int i = 0; i < 2; ++i) {
    if (s.stream[i] != nullptr) cudaStreamSynchronize(s.stream[i]);
    if (s.host[i] != nullptr) s.pinned ? (void)cudaFreeHost(s.host[i]) : free(s.host[i]);
    if (s.dev[i] != nullptr) cudaFree(s.dev[i]);
    if (s.stream[i] != nullptr) cudaStreamDestroy(s.stream[i]);
  }
  for (cudaEvent_t e : {s.start, s.stop, s.joined}) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (status != 0) cudaGetLastError();
  return status;
}

// Values in [-1, 1) from a hash of the index: random-looking data, never zeros.
template <typename T>
__global__ void fill_hashed(T* out, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
    out[i] = static_cast<T>(h) / static_cast<T>(2147483648.0) - static_cast<T>(1);
  }
}

struct GemmBench {
  void* dev[3] = {nullptr, nullptr, nullptr};
  void* cublas = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
};

static int gemm_bench_body(GemmBench& s, int dtype, int allow_tf32, int n, int iterations,
                           double* seconds, char* err, size_t errlen) {
  const size_t count = size_t(n) * n, elem = dtype_size(dtype);
  CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  for (int i = 0; i < 3; ++i) {
    CUDA_CHECK(cudaMalloc(&s.dev[i], count * elem));
    if (dtype == DT_FLOAT32) {
      LAUNCH_CHECK((fill_hashed<<<1024, kThreads, 0, s.stream>>>(static_cast<float*>(s.dev[i]),
                                                                  count, 17u + i)));
    } else {
      LAUNCH_CHECK((fill_hashed<<<1024, kThreads, 0, s.stream>>>(static_cast<double*>(s.dev[i]),
                                                                  count, 17u + i)));
    }
  }
  CUBLAS_CHECK(g_cublas.create(&s.cublas));
  CUBLAS_CHECK(g_cublas.set_stream(s.cublas, s.stream));
  CUBLAS_CHECK(g_cublas.set_math_mode(
      s.cublas, dtype == DT_FLOAT32 && allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  CUDA_CHECK(cudaEventCreate(&s.start));
  CUDA_CHECK(cudaEventCreate(&s.stop));
  for (int i = -1; i < iterations; ++i) {
    CUDA_CHECK(cudaEventRecord(s.start, s.stream));
    TRY(gemm_block(s.cublas, dtype, static_cast<char*>(s.dev[0]), static_cast<char*>(s.dev[1]),
                   static_cast<char*>(s.dev[2]), n, n, n, err, errlen));
    CUDA_CHECK(cudaEventRecord(s.stop, s.stream));
    CUDA_CHECK(cudaEventSynchronize(s.stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, s.start, s.stop));
    if (i >= 0) seconds[i] = ms / 1000.0;
  }
  return 0;
}

// seconds[i] = duration of one n x n x n cuBLAS product on device-resident data.
GMS_API int gms_bench_gemm(int ordinal, int dtype, int allow_tf32, int n, int iterations,
                           double* seconds, char* err, size_t errlen) {
  if ((dtype != DT_FLOAT32 && dtype != DT_FLOAT64) || n < 1 || iterations < 1) {
    return report(err, errlen, GMS_ERR_INVALID_ARGUMENT, "gms_bench_gemm: bad arguments");
  }
  if (g_cublas.library == nullptr) {
    return report(err, errlen, GMS_ERR_CUBLAS_UNAVAILABLE, "cuBLAS is not loaded");
  }
  CUDA_CHECK(cudaSetDevice(ordinal));
  GemmBench s;
  int status = gemm_bench_body(s, dtype, allow_tf32, n, iterations, seconds, err, errlen);
  if (s.stream != nullptr) cudaStreamSynchronize(s.stream);
  if (s.cublas != nullptr) g_cublas.destroy(s.cublas);
  for (void* p : s.dev) {
    if (p != nullptr) cudaFree(p);
  }
  for (cudaEvent_t e : {s.start, s.stop}) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (s.stream != nullptr) cudaStreamDestroy(s.stream);
  if (status != 0) cudaGetLastError();
  return status;
}
