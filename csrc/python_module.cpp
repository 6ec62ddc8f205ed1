// The Python module eclip_kernels._C. Importing it loads this shared library, whose static initializers
// register the operators (csrc/ops.cpp and the per-backend files); the module itself only reports how the
// library was built.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef ECLIP_WITH_CUDA
  const long cuda_built = 1;
#else
  const long cuda_built = 0;
#endif
  // Read by eclip_kernels.available_backends(): were the csrc/cuda sources compiled into this build?
  if (PyModule_AddIntConstant(module, "cuda_built", cuda_built) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
