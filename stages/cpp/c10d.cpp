// PyTorch's distributed engine (c10d) for the training ranks: a TCPStore
// rendezvous, a Gloo process group for CPU tensors and an NCCL one for CUDA
// tensors (as PyTorch's default "cpu:gloo,cuda:nccl"), with the collectives
// data-parallel training uses. libtorch_cpu has Gloo compiled in, but the
// wheel ships no Gloo headers: `build.rs` compiles this file with
// USE_C10D_GLOO against Debian's libgloo-dev headers when they are
// installed, and without them every call fails saying so. NCCL's group is in
// libtorch_cuda; it is compiled in (USE_C10D_NCCL) where `make setup CUDA=1`
// installed NCCL's and CUDA's headers. See `stages/src/dist/`.
#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

struct LlmflowGroup {
  c10::intrusive_ptr<c10d::Store> store;
  int rank;
  int world;
  std::chrono::milliseconds timeout;
  c10::intrusive_ptr<c10d::Backend> gloo;
  // Made at the first collective on a CUDA tensor, which every rank reaches
  // at the same point, since collectives pair up in order.
  c10::intrusive_ptr<c10d::Backend> nccl;
};
#else
struct LlmflowGroup {};
#endif

namespace {
void set_error(char* error, size_t error_len, const char* message) {
  std::strncpy(error, message, error_len - 1);
  error[error_len - 1] = '\0';
}

#ifndef USE_C10D_GLOO
const char* kNoGloo =
    "llmflow-stage was built without Gloo's headers, so it cannot train across processes: "
    "install them (`make setup` as root installs Debian's libgloo-dev) and rebuild";
#else
// The group for `t`'s device: Gloo's for the CPU, NCCL's for CUDA.
c10d::Backend& backend_for(LlmflowGroup& group, const at::Tensor& t) {
  if (!t.is_cuda()) return *group.gloo;
#ifdef USE_C10D_NCCL
  if (!group.nccl) {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = group.timeout;
    // Its own keys in the store, beside Gloo's.
    auto store = c10::make_intrusive<c10d::PrefixStore>("nccl", group.store);
    group.nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, group.rank, group.world, options);
  }
  return *group.nccl;
#else
  throw std::runtime_error(
      "llmflow-stage was built without NCCL, so it cannot train across processes on CUDA: "
      "`make setup CUDA=1` installs NCCL's and CUDA's headers; rebuild");
#endif
}
#endif
}  // namespace

// Makes `grad` (a view of a flat bucket) the gradient `var` accumulates
// into, as PyTorch's DDP does with gradient_as_bucket_view: the backward pass
// adds into the bucket in place, and the bucket goes to the collective as is.
extern "C" void llmflow_set_grad(at::Tensor* var, at::Tensor* grad) { var->mutable_grad() = *grad; }

// Joins the group: the rank that `serve`s (rank 0, unless a launcher's agent
// already serves it) serves the TCPStore at host:port, the others connect
// to it. `iface`, if not empty, is the network interface Gloo binds
// (GLOO_SOCKET_IFNAME); else `bind_host`'s address, or if that is empty the
// address this machine's hostname resolves to. Null on failure.
extern "C" LlmflowGroup* llmflow_c10d_gloo(const char* host, int port, int rank, int world, long long timeout_ms,
                                           bool serve, const char* iface, const char* bind_host, char* error, size_t error_len) {
#ifdef USE_C10D_GLOO
  try {
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(port);
    store_options.isServer = serve;
    store_options.numWorkers = world;
    store_options.timeout = timeout;
    auto group = new LlmflowGroup();
    group->rank = rank;
    group->world = world;
    group->timeout = timeout;
    group->store = c10::make_intrusive<c10d::TCPStore>(std::string(host), store_options);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(*iface       ? c10d::ProcessGroupGloo::createDeviceForInterface(iface)
                               : *bind_host ? c10d::ProcessGroupGloo::createDeviceForHostname(bind_host)
                                            : c10d::ProcessGroupGloo::createDefaultDevice());
    options->threads = 1;
    group->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, options);
    return group;
  } catch (const std::exception& e) {
    set_error(error, error_len, e.what());
    return nullptr;
  }
#else
  set_error(error, error_len, kNoGloo);
  return nullptr;
#endif
}

extern "C" void llmflow_c10d_free(LlmflowGroup* group) {
#ifdef USE_C10D_GLOO
  // As destroy_process_group does: NCCL's communicators end before the group.
  if (group->nccl) group->nccl->shutdown();
#endif
  delete group;
}

// op: 0 all-reduce (sum, in place on `a`), 1 reduce-scatter (sum of `b`,
// world × n elements, into `a`, n), 2 all-gather (`b` into `a`, world × n),
// 3 broadcast (`a` from rank `root`). Waits for the collective (on CUDA,
// makes the current stream wait for it); 0 on success, else -1 with the
// message in `error`.
extern "C" int llmflow_c10d_collective(LlmflowGroup* group, int op, at::Tensor* a, at::Tensor* b, int root, char* error,
                                       size_t error_len) {
#ifdef USE_C10D_GLOO
  try {
    c10d::Backend& pg = backend_for(*group, *a);
    c10::intrusive_ptr<c10d::Work> work;
    std::vector<at::Tensor> tensors{*a};
    switch (op) {
      case 0:
        work = pg.allreduce(tensors);
        break;
      case 1:
        work = pg._reduce_scatter_base(*a, *b);
        break;
      case 2:
        work = pg._allgather_base(*a, *b);
        break;
      case 3: {
        c10d::BroadcastOptions options;
        options.rootRank = root;
        work = pg.broadcast(tensors, options);
        break;
      }
      default:
        set_error(error, error_len, "unknown collective");
        return -1;
    }
    work->wait();
    return 0;
  } catch (const std::exception& e) {
    set_error(error, error_len, e.what());
    return -1;
  }
#else
  (void)group, (void)op, (void)a, (void)b, (void)root;
  set_error(error, error_len, kNoGloo);
  return -1;
#endif
}
