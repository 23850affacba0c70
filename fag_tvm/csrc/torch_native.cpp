// The torch op's native eager path: one C++ autograd op whose forward and backward hand torch tensors to a
// target's compiled kernels (tvm-ffi functions) without Python in between.
//
// What a call needs that does not change between calls of one signature -- the kernel function, the packed
// metadata (bmeta, iparams, fparams) for both tile-skip choices, the outputs' shapes, which optional inputs
// the specialisation reads, which data-dependent checks apply -- is a "launch", registered once from Python
// (fag_tvm/torch_native.py, from targets/llvm/launch.Launch, whose call this mirrors line for line). A call
// then costs one dispatcher entry, the output allocations and the kernel.
//
// Buffers are handed over as 1-D DLTensors (the kernels' ABI): contiguous and 64-byte aligned, copied where
// a tensor is not; bf16 as its uint16 bits and bool masks as uint8, exactly as the NumPy launcher views them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <tvm/ffi/c_api.h>

#include <array>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace fag_tvm_native {

constexpr int64_t kAlign = 64;
constexpr int64_t kStatsLanes = 8;  // core/abi.STATS_LANES
constexpr int64_t kMaxLaunches = 4096;
constexpr size_t kWorkspaceReuseFloats = (1 << 20) / 4;  // launch._WS_REUSE_BYTES

// flags of a launch (register_launch's `flags`, in this order)
enum Flag { kBackward, kPse, kMask, kDrop, kBand, kRowCheck, kDpse, kNumFlags };

struct Launch {
  TVMFFIObjectHandle fn = nullptr;    // a reference is held (never released: launches live for the process)
  std::array<std::vector<at::Tensor>, 2> params;  // [tile_skip] -> bmeta, iparams, fparams
  std::array<bool, kNumFlags> flags{};
  std::vector<std::vector<int64_t>> out_shapes;
  int64_t workspace_floats = 0;
};

std::array<std::atomic<Launch*>, kMaxLaunches> g_launches{};
std::atomic<int64_t> g_count{0};
std::mutex g_register;

const Launch& launch_at(int64_t id) {
  Launch* l = (id >= 0 && id < kMaxLaunches) ? g_launches[id].load(std::memory_order_acquire) : nullptr;
  TORCH_CHECK(l != nullptr, "fag_tvm_native: unknown launch ", id);
  return *l;
}

DLDataType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return {kDLFloat, 32, 1};
    case at::kHalf: return {kDLFloat, 16, 1};
    case at::kBFloat16: return {kDLUInt, 16, 1};  // kernels store bf16 as raw bits
    case at::kBool: return {kDLUInt, 8, 1};
    case at::kByte: return {kDLUInt, 8, 1};
    case at::kLong: return {kDLInt, 64, 1};
    case at::kInt: return {kDLInt, 32, 1};
    default: TORCH_CHECK(false, "fag_tvm_native: unsupported dtype ", t);
  }
  return {};
}

bool usable(const at::Tensor& t) {
  return t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0;
}

// A tensor as a kernel reads it: contiguous and 64-byte aligned (an aligned copy otherwise: torch's CPU
// allocator aligns to 64 bytes, so a fresh contiguous clone is).
at::Tensor as_kernel_input(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fag_tvm_native: tensor on ", t.device(), "; only CPU tensors");
  if (usable(t)) return t;
  at::Tensor c = t.clone(at::MemoryFormat::Contiguous);
  TORCH_CHECK(usable(c), "fag_tvm_native: cannot allocate a 64-byte aligned buffer");
  return c;
}

at::Tensor new_output(const std::vector<int64_t>& shape, at::ScalarType dt, bool poison) {
  at::Tensor o = at::empty(shape, at::TensorOptions().dtype(dt).device(at::kCPU));
  TORCH_CHECK(usable(o), "fag_tvm_native: cannot allocate a 64-byte aligned buffer");
  if (poison) o.fill_(std::numeric_limits<float>::quiet_NaN());
  return o;
}

// The argument list of one kernel call: 1-D DLTensors over the tensors' memory, kept alive by `keep`.
class Args {
 public:
  explicit Args(size_t n) { dl_.reserve(n); shapes_.reserve(n); keep_.reserve(n); }
  void add(const at::Tensor& t) {
    keep_.push_back(t);
    shapes_.push_back(t.numel());
    DLTensor d{};
    d.data = t.data_ptr();
    d.device = {kDLCPU, 0};
    d.ndim = 1;
    d.dtype = kernel_dtype(t.scalar_type());
    d.shape = nullptr;  // set in call(): shapes_ may still grow
    d.strides = nullptr;
    d.byte_offset = 0;
    dl_.push_back(d);
  }
  void call(TVMFFIObjectHandle fn) {
    std::vector<TVMFFIAny> any(dl_.size());
    for (size_t i = 0; i < dl_.size(); ++i) {
      dl_[i].shape = &shapes_[i];
      std::memset(&any[i], 0, sizeof(TVMFFIAny));
      any[i].type_index = kTVMFFIDLTensorPtr;
      any[i].v_ptr = &dl_[i];
    }
    TVMFFIAny result;
    std::memset(&result, 0, sizeof(TVMFFIAny));
    result.type_index = kTVMFFINone;
    if (TVMFFIFunctionCall(fn, any.data(), static_cast<int32_t>(any.size()), &result) != 0) {
      TVMFFIObjectHandle err = nullptr;
      TVMFFIErrorMoveFromRaised(&err);
      std::string msg = "fag_tvm_native: kernel call failed";
      if (err != nullptr) {
        const TVMFFIErrorCell* cell = TVMFFIErrorGetCellPtr(err);
        msg += ": " + std::string(cell->kind.data, cell->kind.size) + ": " +
               std::string(cell->message.data, cell->message.size);
        TVMFFIObjectDecRef(err);
      }
      TORCH_CHECK(false, msg);
    }
    if (result.type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectDecRef(result.v_obj);
  }
  size_t size() const { return dl_.size(); }

 private:
  std::vector<DLTensor> dl_;
  std::vector<int64_t> shapes_;
  std::vector<at::Tensor> keep_;
};

void add_params(Args& args, const Launch& l, bool tile_skip) {
  for (const at::Tensor& p : l.params[tile_skip ? 1 : 0]) args.add(p);
}

// every 8th float of a stats buffer (one value per row)
template <typename F>
bool any_row(const at::Tensor& stats, F pred) {
  const float* p = stats.data_ptr<float>();
  for (int64_t i = 0, n = stats.numel(); i < n; i += kStatsLanes)
    if (pred(p + i)) return true;
  return false;
}

void add_optional(Args& args, const Launch& l, const c10::optional<at::Tensor>& pse,
                  const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& drop) {
  if (l.flags[kPse]) args.add(as_kernel_input(pse.value()));
  if (l.flags[kMask]) args.add(as_kernel_input(mask.value()));
  if (l.flags[kDrop]) args.add(as_kernel_input(drop.value()));
}

// forward: (attention_out, softmax_max, softmax_sum); see launch.Launch.__call__
std::vector<at::Tensor> run_forward(const Launch& l, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const c10::optional<at::Tensor>& pse,
                                    const c10::optional<at::Tensor>& mask,
                                    const c10::optional<at::Tensor>& drop, bool poison) {
  Args ins(16);
  ins.add(as_kernel_input(q));
  ins.add(as_kernel_input(k));
  ins.add(as_kernel_input(v));
  add_optional(ins, l, pse, mask, drop);
  at::Tensor out = new_output(l.out_shapes[0], q.scalar_type(), poison);
  at::Tensor smax = new_output(l.out_shapes[1], at::kFloat, poison);
  at::Tensor ssum = new_output(l.out_shapes[2], at::kFloat, poison);
  for (bool tile_skip : {true, false}) {
    Args args = ins;
    add_params(args, l, tile_skip);
    args.add(out);
    args.add(smax);
    args.add(ssum);
    args.call(l.fn);
    // A fully masked row without invalid-line handling has uniform P over ALL Skv columns, including tiles
    // the band rule skipped: recompute without skipping (rare; SPEC §8).
    if (!l.flags[kRowCheck] || !any_row(smax, [](const float* m) { return *m == -FLT_MAX; })) break;
  }
  return {out, smax, ssum};
}

// backward: (dq, dk, dv, dpse fp32 accumulator or undefined)
std::vector<at::Tensor> run_backward(const Launch& l, const at::Tensor& dy, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const at::Tensor& smax, const at::Tensor& ssum,
                                     const c10::optional<at::Tensor>& pse,
                                     const c10::optional<at::Tensor>& mask,
                                     const c10::optional<at::Tensor>& drop, bool poison) {
  Args args(24);
  at::Tensor m = as_kernel_input(smax), s = as_kernel_input(ssum);
  for (const at::Tensor* t : {&q, &k, &v, &dy, &out}) args.add(as_kernel_input(*t));
  args.add(m);
  args.add(s);
  add_optional(args, l, pse, mask, drop);
  bool tile_skip = true;
  if (l.flags[kBand]) {
    // Rows that are fully masked but carry ordinary stats (max=-FLT_MAX, sum<FLT_MAX) have uniform P over
    // every column, skipped tiles included: then no tile may be skipped.
    const float* mp = m.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    for (int64_t i = 0, n = m.numel(); i < n && tile_skip; i += kStatsLanes)
      if (mp[i] == -FLT_MAX && sp[i] != FLT_MAX) tile_skip = false;
  }
  add_params(args, l, tile_skip);
  at::Tensor dq = new_output(l.out_shapes[0], q.scalar_type(), poison);
  at::Tensor dk = new_output(l.out_shapes[1], k.scalar_type(), poison);
  at::Tensor dv = new_output(l.out_shapes[2], v.scalar_type(), poison);
  args.add(dq);
  args.add(dk);
  args.add(dv);
  at::Tensor dpse;
  if (l.flags[kDpse]) {
    dpse = at::zeros(pse.value().sizes(), at::TensorOptions().dtype(at::kFloat));
    TORCH_CHECK(usable(dpse), "fag_tvm_native: cannot allocate a 64-byte aligned buffer");
    args.add(dpse);
  }
  // The kernel initialises every workspace element it reads: small ones are reused per thread.
  thread_local at::Tensor ws_reuse;
  at::Tensor ws;
  size_t floats = static_cast<size_t>(std::max<int64_t>(1, l.workspace_floats));
  if (floats > kWorkspaceReuseFloats) {
    ws = new_output({static_cast<int64_t>(floats)}, at::kFloat, false);
  } else {
    if (!ws_reuse.defined() || static_cast<size_t>(ws_reuse.numel()) < floats)
      ws_reuse = new_output({static_cast<int64_t>(std::max<size_t>(floats, 4096))}, at::kFloat, false);
    ws = ws_reuse;
  }
  args.add(ws);
  args.call(l.fn);
  return {dq, dk, dv, dpse};
}

class FusionAttention : public torch::autograd::Function<FusionAttention> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& pse,
                                                const c10::optional<at::Tensor>& mask,
                                                const c10::optional<at::Tensor>& drop, int64_t fwd,
                                                int64_t bwd, bool pse_grad, bool poison) {
    const Launch& lf = launch_at(fwd);
    TORCH_CHECK(!lf.flags[kBackward] && launch_at(bwd).flags[kBackward],
                "fag_tvm_native: launch ", fwd, " must be a forward and ", bwd, " a backward");
    std::vector<at::Tensor> o = run_forward(lf, q, k, v, pse, mask, drop, poison);
    ctx->save_for_backward({q, k, v, o[0], o[1], o[2], pse.value_or(at::Tensor()),
                            mask.value_or(at::Tensor()), drop.value_or(at::Tensor())});
    ctx->mark_non_differentiable({o[1], o[2]});  // softmax statistics: outputs, not differentiable
    ctx->saved_data["bwd"] = bwd;
    ctx->saved_data["pse_grad"] = pse_grad;
    ctx->saved_data["poison"] = poison;
    return o;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    std::vector<at::Tensor> g =
        run_backward(launch_at(ctx->saved_data["bwd"].toInt()), dy, s[0], s[1], s[2], s[3], s[4], s[5],
                     opt(s[6]), opt(s[7]), opt(s[8]), ctx->saved_data["poison"].toBool());
    at::Tensor dpse;
    if (ctx->saved_data["pse_grad"].toBool() && g[3].defined()) dpse = g[3].to(s[6].scalar_type());
    return {g[0], g[1], g[2], dpse, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const c10::optional<at::Tensor>& pse,
                                                          const c10::optional<at::Tensor>& mask,
                                                          const c10::optional<at::Tensor>& drop, int64_t fwd,
                                                          int64_t bwd, bool pse_grad, bool poison) {
  auto o = FusionAttention::apply(q, k, v, pse, mask, drop, fwd, bwd, pse_grad, poison);
  return {o[0], o[1], o[2]};
}

int64_t register_launch(int64_t fn, std::vector<at::Tensor> params, std::vector<int64_t> flags,
                        std::vector<int64_t> out_shapes, int64_t workspace_floats) {
  TORCH_CHECK(params.size() == 6, "register_launch: 6 params (bmeta, iparams, fparams without, then with tile skipping)");
  TORCH_CHECK(flags.size() == kNumFlags, "register_launch: ", int(kNumFlags), " flags");
  auto l = std::make_unique<Launch>();
  l->fn = reinterpret_cast<TVMFFIObjectHandle>(fn);
  for (int ts = 0; ts < 2; ++ts)
    for (int i = 0; i < 3; ++i) {
      const at::Tensor& p = params[ts * 3 + i];
      TORCH_CHECK(usable(p) && p.dim() == 1, "register_launch: params must be flat, contiguous and aligned");
      l->params[ts].push_back(p);
    }
  for (int i = 0; i < kNumFlags; ++i) l->flags[i] = flags[i] != 0;
  for (size_t i = 0; i < out_shapes.size();) {
    int64_t rank = out_shapes[i++];
    TORCH_CHECK(rank >= 0 && i + rank <= out_shapes.size(), "register_launch: bad out_shapes");
    l->out_shapes.emplace_back(out_shapes.begin() + i, out_shapes.begin() + i + rank);
    i += rank;
  }
  TORCH_CHECK(l->out_shapes.size() == 3, "register_launch: 3 output shapes");
  l->workspace_floats = workspace_floats;
  std::lock_guard<std::mutex> lock(g_register);
  int64_t id = g_count.load();
  TORCH_CHECK(id < kMaxLaunches, "register_launch: too many launches");
  TVMFFIObjectIncRef(l->fn);
  g_launches[id].store(l.release(), std::memory_order_release);
  g_count.store(id + 1);
  return id;
}

int64_t capacity() { return kMaxLaunches - g_count.load(); }

}  // namespace fag_tvm_native

using namespace fag_tvm_native;  // NOLINT

TORCH_LIBRARY(fag_tvm_native, m) {
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? pse, Tensor? atten_mask, Tensor? drop_mask, "
        "int fwd, int bwd, bool pse_grad, bool poison) -> (Tensor, Tensor, Tensor)");
  m.def("register_launch(int fn, Tensor[] params, int[] flags, int[] out_shapes, int workspace_floats) -> int",
        &register_launch);
  m.def("capacity() -> int", &capacity);
}

TORCH_LIBRARY_IMPL(fag_tvm_native, CompositeImplicitAutograd, m) {
  m.impl("attention", attention);
}
