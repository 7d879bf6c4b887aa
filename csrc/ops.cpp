// Registration of oppo_runtime's torch ops (TORCH_LIBRARY: usable from torch.compile and CUDA
// graphs) and the Python module `oppo_runtime._C` that loads them. No pybind11 needed: the
// module only has to exist and say whether the CUDA kernels were compiled in.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef OPPO_WITH_CUDA
void kv_append_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& slot_mapping);
#include "cuda_ops.h"
#endif

TORCH_LIBRARY(oppo, m) {
  m.def("kv_append(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, Tensor(b!)? workspace=None, int max_partition=0) -> ()");
  m.def("paged_decode_attention_rope(Tensor(a!) out, Tensor q, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor block_tables, Tensor context_lens, float scale, Tensor cos_sin, Tensor positions, Tensor slots, "
        "Tensor(d!)? workspace=None, int max_partition=0) -> ()");
  m.def("paged_decode_workspace_size(Tensor q, Tensor k_cache, Tensor block_tables, int max_partition=0) -> int");
  m.def("decode_cta_stamps(Tensor(a!) stamps) -> ()");
  m.def("decode_tile_stamps(Tensor(a!) stamps) -> ()");
  m.def("prefill_item_stamps(Tensor(a!) stamps) -> ()");
  m.def("prefill_turn_stamps(Tensor(a!) stamps) -> ()");
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
        "Tensor context_lens, Tensor block_tables, float scale, int max_seqlen_q) -> ()");
  m.def("gate_up_silu(Tensor(a!) act, Tensor x, Tensor w) -> ()");
  m.def("linear_ksplit(Tensor(a!) out, Tensor x, Tensor w) -> ()");
}

#ifdef OPPO_WITH_CUDA
TORCH_LIBRARY_IMPL(oppo, CUDA, m) {
  m.impl("kv_append", &kv_append_cuda);
  OPPO_REGISTER_CUDA_OPS(m)
}
#endif

static PyObject* cuda_kernels_compiled(PyObject*, PyObject*) {
#ifdef OPPO_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* cuda_arch_list(PyObject*, PyObject*) {
#ifdef OPPO_CUDA_ARCHS
  return PyUnicode_FromString(OPPO_CUDA_ARCHS);
#else
  return PyUnicode_FromString("");
#endif
}

static PyMethodDef methods[] = {
    {"cuda_kernels_compiled", cuda_kernels_compiled, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"cuda_arch_list", cuda_arch_list, METH_NOARGS, "The CUDA architectures the kernels were built for."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "oppo_runtime compiled ops (torch.ops.oppo)", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
