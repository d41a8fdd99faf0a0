// A recorded step's dispatcher calls, replayed from C++ (kiln.runtime.recorded_step compiles a recording into
// this): each call's argument stack is built once, and a replay fills in the earlier calls' outputs and calls
// the operator boxed, without Python between the calls.
//
// A call is added as its operator's name and overload and one spec per schema argument (every argument, the
// defaults filled in by the caller), a flat list of int64:
//   0 none | 1 i: tensors[i] | 2 c o e: output o of call c (element e of it when e >= 0, -1: all of it)
//   3 v: int | 4 i: floats[i] | 5 v: bool | 6 n v1..vn: int list | 7 n then n element specs (0, 1 or 2 each):
//   a tensor list, typed by the schema (Tensor[] or Tensor?[]) | 8 i: the dtype of tensors[i] (a ScalarType)
//   | 9 v: a MemoryFormat | 10: the CPU device | 11: the strided layout | 12 v, 13 i: an int v or floats[i]
//   where the schema takes a Tensor, as Python's call passes it: a wrapped number (a 0-dim tensor that type
//   promotion treats as a Python scalar)
#include <ATen/ScalarOps.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/core/InferenceMode.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

struct Input {
  int64_t slot;  // argument position
  int64_t elem;  // element of a tensor list argument, -1: the argument itself
  int64_t call, out, out_elem;
};

struct Call {
  c10::OperatorHandle op;
  std::vector<c10::IValue> stack;  // the arguments, with holes where inputs go
  std::vector<Input> inputs;
};

struct StepProgram : torch::CustomClassHolder {
  std::vector<Call> calls;
  int64_t result_call = -1, result_out = 0, result_elem = -1;

  void add(const std::string& name, const std::string& overload, const std::vector<at::Tensor>& tensors,
           const std::vector<double>& floats, const std::vector<int64_t>& spec) {
    const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& args = op.schema().arguments();
    Call call{op, {}, {}};
    size_t at = 0;
    const auto next = [&]() -> int64_t {
      TORCH_CHECK(at < spec.size(), "StepProgram.add: the spec of ", name, " ends early");
      return spec[at++];
    };
    // One element or argument that is a tensor, none, or an earlier output (codes 0, 1, 2).
    const auto tensor_like = [&](int64_t code, int64_t slot, int64_t elem) -> c10::IValue {
      if (code == 0) return c10::IValue();
      if (code == 1) return c10::IValue(tensors.at(next()));
      TORCH_CHECK(code == 2, "StepProgram.add: code ", code, " where ", name, " takes a tensor");
      const int64_t c = next(), o = next(), e = next();
      TORCH_CHECK(c >= 0 && c < static_cast<int64_t>(calls.size()), "StepProgram.add: call ", c, " comes later");
      call.inputs.push_back({slot, elem, c, o, e});
      return c10::IValue();
    };
    for (size_t i = 0; i < args.size(); ++i) {
      const int64_t code = next(), slot = static_cast<int64_t>(i);
      switch (code) {
        case 0:
        case 1:
        case 2:
          call.stack.push_back(tensor_like(code, slot, -1));
          break;
        case 3:
          call.stack.emplace_back(next());
          break;
        case 4:
          call.stack.emplace_back(floats.at(next()));
          break;
        case 5:
          call.stack.emplace_back(next() != 0);
          break;
        case 6: {
          std::vector<int64_t> values(next());
          for (auto& v : values) v = next();
          call.stack.emplace_back(values);
          break;
        }
        case 7: {
          const int64_t n = next();
          const bool optional = args[i].type()->str().find('?') != std::string::npos;
          if (optional) {
            c10::List<std::optional<at::Tensor>> list;
            for (int64_t e = 0; e < n; ++e) {
              const c10::IValue v = tensor_like(next(), slot, e);
              list.push_back(v.isNone() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(v.toTensor()));
            }
            call.stack.emplace_back(list);
          } else {
            c10::List<at::Tensor> list;
            for (int64_t e = 0; e < n; ++e) {
              const c10::IValue v = tensor_like(next(), slot, e);
              list.push_back(v.isNone() ? at::Tensor() : v.toTensor());
            }
            call.stack.emplace_back(list);
          }
          break;
        }
        case 8:
          call.stack.emplace_back(tensors.at(next()).scalar_type());
          break;
        case 9:
          call.stack.emplace_back(static_cast<c10::MemoryFormat>(next()));
          break;
        case 10:
          call.stack.emplace_back(c10::Device(c10::kCPU));
          break;
        case 11:
          call.stack.emplace_back(c10::kStrided);
          break;
        case 12:
        case 13: {
          at::Tensor wrapped = code == 12 ? at::scalar_to_tensor(c10::Scalar(next()))
                                          : at::scalar_to_tensor(c10::Scalar(floats.at(next())));
          wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
          call.stack.emplace_back(wrapped);
          break;
        }
        default:
          TORCH_CHECK(false, "StepProgram.add: unknown code ", code, " for argument ", i, " of ", name);
      }
    }
    TORCH_CHECK(at == spec.size(), "StepProgram.add: the spec of ", name, " has ", spec.size() - at, " left over");
    calls.push_back(std::move(call));
  }

  void set_result(int64_t call, int64_t out, int64_t elem) {
    TORCH_CHECK(call >= 0 && call < static_cast<int64_t>(calls.size()), "StepProgram: no call ", call);
    result_call = call;
    result_out = out;
    result_elem = elem;
  }

  at::Tensor run() {
    TORCH_CHECK(result_call >= 0, "StepProgram: run before set_result");
    c10::InferenceMode guard;
    std::vector<std::vector<c10::IValue>> outs(calls.size());
    const auto output = [&](int64_t c, int64_t o, int64_t e) -> c10::IValue {
      const c10::IValue& v = outs[c].at(o);
      return e < 0 ? v : v.toList().get(e);
    };
    for (size_t i = 0; i < calls.size(); ++i) {
      Call& call = calls[i];
      std::vector<c10::IValue> stack = call.stack;
      for (const Input& in : call.inputs) {
        c10::IValue v = output(in.call, in.out, in.out_elem);
        if (in.elem < 0)
          stack[in.slot] = std::move(v);
        else
          stack[in.slot].toList().set(in.elem, std::move(v));  // the template's list: refilled every run
      }
      call.op.callBoxed(&stack);
      outs[i] = std::move(stack);
    }
    at::Tensor result = output(result_call, result_out, result_elem).toTensor();
    for (Call& call : calls)  // the templates' lists hold no activations between runs
      for (const Input& in : call.inputs)
        if (in.elem >= 0) call.stack[in.slot].toList().set(in.elem, c10::IValue());
    return result;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.class_<StepProgram>("StepProgram")
      .def(torch::init<>())
      .def("add", &StepProgram::add)
      .def("set_result", &StepProgram::set_result)
      .def("run", &StepProgram::run);
}
