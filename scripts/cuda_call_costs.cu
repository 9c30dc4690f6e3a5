// On a GPU machine: what the CUDA calls of a small request cost (host clock, median of 20,000):
// the runtime calls gms_elementwise_zero_copy makes, a launch and its wait, and a 16 KiB float32
// add three ways (pinned host memory in place, through staging copies, and one DMA each way
// around a kernel on device memory); then what launching without waiting would cost the caller
// (the host side of a launch, an event record and query, a stream callback) and how soon each
// way of learning that a kernel finished sees it. docs/benchmarks.md has the figures.
//
//   nvcc -O2 -arch=sm_90 -o /tmp/cuda_call_costs scripts/cuda_call_costs.cu && /tmp/cuda_call_costs
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

__global__ void add(float4* out, const float4* a, const float4* b, size_t n) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i < n) {
    const float4 x = a[i], y = b[i];
    out[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
}

// Writes the add, then flag[0] = 1 once every thread of the (single) block has written.
__global__ void add_then_flag(float4* out, const float4* a, const float4* b, size_t n,
                              volatile int* flag) {
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float4 x = a[i], y = b[i];
    out[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) *flag = 1;
}

static std::atomic<int> g_called{0};
static void CUDART_CB on_done(cudaStream_t, cudaError_t, void*) { g_called.store(1); }

// The median host time of timed(), with untimed() after each (not counted).
template <class F, class G>
static double median_split_us(F timed, G untimed, int reps = 20000) {
  std::vector<double> t(reps);
  for (int i = 0; i < 200; ++i) timed(), untimed();
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    timed();
    t[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
               .count();
    untimed();
  }
  std::sort(t.begin(), t.end());
  return t[reps / 2];
}

template <class F>
static double median_us(F f, int reps = 20000) {
  return median_split_us(f, [] {}, reps);
}

static void* pinned(size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) std::exit(1);
  return p;
}

int main() {
  if (cudaSetDevice(0) != cudaSuccess || cudaFree(0) != cudaSuccess) return 1;
  const size_t bytes = 16384, n4 = bytes / 16;
  const unsigned blocks = static_cast<unsigned>((n4 + 255) / 256);
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  float *ha = static_cast<float*>(pinned(bytes)), *hb = static_cast<float*>(pinned(bytes));
  float* ho = static_cast<float*>(pinned(bytes));
  char* stage_in = static_cast<char*>(pinned(2 * bytes));
  char* stage_out = static_cast<char*>(pinned(bytes));
  char *dev_in = nullptr, *dev_out = nullptr;
  cudaMalloc(&dev_in, 2 * bytes);
  cudaMalloc(&dev_out, bytes);
  std::vector<float> pa(bytes / 4), pb(bytes / 4), po(bytes / 4);
  for (size_t i = 0; i < bytes / 4; ++i) pa[i] = ha[i] = i, pb[i] = hb[i] = 2.0f * i;
  auto* a4 = reinterpret_cast<float4*>(ha);
  auto* b4 = reinterpret_cast<float4*>(hb);
  auto* o4 = reinterpret_cast<float4*>(ho);
  cudaPointerAttributes attr;
  std::printf("cudaSetDevice (current)      %6.2f us\n", median_us([&] { cudaSetDevice(0); }));
  std::printf("cudaGetLastError             %6.2f us\n", median_us([&] { cudaGetLastError(); }));
  std::printf("cudaPointerGetAttributes pin %6.2f us\n",
              median_us([&] { cudaPointerGetAttributes(&attr, ha); }));
  std::printf("cudaPointerGetAttributes pag %6.2f us\n",
              median_us([&] { cudaPointerGetAttributes(&attr, pa.data()); }));
  std::printf("sync of an idle stream       %6.2f us\n",
              median_us([&] { cudaStreamSynchronize(st); }));
  std::printf("empty kernel + sync          %6.2f us\n", median_us([&] {
                add<<<1, 32, 0, st>>>(o4, a4, b4, 0);
                cudaStreamSynchronize(st);
              }));
  std::printf("zero copy pinned in place    %6.2f us\n", median_us([&] {
                add<<<blocks, 256, 0, st>>>(o4, a4, b4, n4);
                cudaStreamSynchronize(st);
              }));
  std::printf("zero copy via staging+memcpy %6.2f us\n", median_us([&] {
                std::memcpy(stage_in, pa.data(), bytes);
                std::memcpy(stage_in + bytes, pb.data(), bytes);
                add<<<blocks, 256, 0, st>>>(reinterpret_cast<float4*>(stage_out),
                                            reinterpret_cast<float4*>(stage_in),
                                            reinterpret_cast<float4*>(stage_in + bytes), n4);
                cudaStreamSynchronize(st);
                std::memcpy(po.data(), stage_out, bytes);
              }));
  std::printf("one DMA in, kernel, DMA out  %6.2f us\n", median_us([&] {
                std::memcpy(stage_in, pa.data(), bytes);
                std::memcpy(stage_in + bytes, pb.data(), bytes);
                cudaMemcpyAsync(dev_in, stage_in, 2 * bytes, cudaMemcpyHostToDevice, st);
                add<<<blocks, 256, 0, st>>>(reinterpret_cast<float4*>(dev_out),
                                            reinterpret_cast<float4*>(dev_in),
                                            reinterpret_cast<float4*>(dev_in + bytes), n4);
                cudaMemcpyAsync(stage_out, dev_out, bytes, cudaMemcpyDeviceToHost, st);
                cudaStreamSynchronize(st);
                std::memcpy(po.data(), stage_out, bytes);
              }));
  // Launching without waiting: what the caller's thread spends, and how soon it can know.
  auto sync = [&] { cudaStreamSynchronize(st); };
  cudaEvent_t ev;
  cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  std::printf("launch only (host side)      %6.2f us\n", median_split_us([&] {
                add<<<blocks, 256, 0, st>>>(o4, a4, b4, n4);
              }, sync));
  std::printf("cudaEventRecord              %6.2f us\n",
              median_split_us([&] { cudaEventRecord(ev, st); }, sync));
  std::printf("cudaEventQuery (done)        %6.2f us\n",
              median_us([&] { cudaEventQuery(ev); }));
  std::printf("cudaStreamQuery (idle)       %6.2f us\n", median_us([&] { cudaStreamQuery(st); }));
  std::printf("cudaStreamAddCallback        %6.2f us\n", median_split_us([&] {
                cudaStreamAddCallback(st, on_done, nullptr, 0);
              }, sync));
  std::printf("add, then spin on its event  %6.2f us\n", median_us([&] {
                add<<<blocks, 256, 0, st>>>(o4, a4, b4, n4);
                cudaEventRecord(ev, st);
                while (cudaEventQuery(ev) == cudaErrorNotReady) {
                }
              }));
  std::printf("add, then its callback seen  %6.2f us\n", median_split_us([&] {
                g_called.store(0);
                add<<<blocks, 256, 0, st>>>(o4, a4, b4, n4);
                cudaStreamAddCallback(st, on_done, nullptr, 0);
                while (g_called.load() == 0) {
                }
              }, sync));
  int* flag = static_cast<int*>(pinned(sizeof(int)));
  std::printf("add, then spin on a flag     %6.2f us\n", median_split_us([&] {
                *reinterpret_cast<volatile int*>(flag) = 0;
                add_then_flag<<<1, 1024, 0, st>>>(o4, a4, b4, n4, flag);
                while (*reinterpret_cast<volatile int*>(flag) == 0) {
                }
              }, sync));
  std::printf("same add (1 block) + sync    %6.2f us\n", median_us([&] {
                add_then_flag<<<1, 1024, 0, st>>>(o4, a4, b4, n4, flag);
                cudaStreamSynchronize(st);
              }));
  bool right = true;
  for (size_t i = 0; i < bytes / 4; ++i) right &= po[i] == 3.0f * i && ho[i] == 3.0f * i;
  const cudaError_t last = cudaGetLastError();
  std::printf("results %s, last error: %s\n", right ? "right" : "WRONG", cudaGetErrorString(last));
  return right && last == cudaSuccess ? 0 : 1;
}
