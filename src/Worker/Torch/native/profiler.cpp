// Optional kernel profiler for the benchmark (libfinetune_torch_profiler.so): libtorch's Kineto profiler around a
// region of the C# process, saved as a Chrome trace. Built only on demand (`cmake --build … --target
// finetune_torch_profiler`, CUDA libtorch 2.x); the benchmark runs without it when it is absent.
#include <torch/csrc/autograd/profiler_kineto.h>
#include <exception>
#include <set>
#include <string>

#define FT_PROF_API extern "C" __attribute__((visibility("default")))

namespace {
thread_local std::string g_prof_error;
}

FT_PROF_API const char* ft_profiler_error() { return g_prof_error.c_str(); }

// CPU ops and CUDA kernels from now until ft_profiler_stop.
FT_PROF_API int ft_profiler_start() {
  try {
    // Input shapes on: the benchmark's report attributes each kernel to the op (and the shapes) that launched it.
    torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO, /*report_input_shapes=*/true);
    std::set<torch::profiler::impl::ActivityType> activities{torch::profiler::impl::ActivityType::CPU,
                                                             torch::profiler::impl::ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    g_prof_error = e.what();
    return -1;
  }
}

// Stops and writes the Chrome trace to `path`.
FT_PROF_API int ft_profiler_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (result && path) result->save(path);
    return 0;
  } catch (const std::exception& e) {
    g_prof_error = e.what();
    return -1;
  }
}
