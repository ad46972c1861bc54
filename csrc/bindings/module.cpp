// The Python module elva_kernels._C. Importing it loads this library, whose TORCH_LIBRARY_IMPL blocks register
// the kernels; the module itself only reports how it was built. It uses the limited Python API only, so that
// it does not depend on libtorch_python.
#include <Python.h>
#include <torch/version.h>

namespace {

#ifdef ELVA_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

#ifdef _OPENMP
constexpr bool kWithOpenMP = true;
#else
constexpr bool kWithOpenMP = false;
#endif

#ifdef ELVA_DEBUG_BUILD
constexpr bool kDebugBuild = true;
#else
constexpr bool kDebugBuild = false;
#endif

PyObject* build_info(PyObject*, PyObject*) {
  // "O" with the bool singletons gives Python bools (Py_BuildValue takes its own references).
  return Py_BuildValue("{s:s,s:O,s:O,s:O}", "torch", TORCH_VERSION, "cuda", kWithCuda ? Py_True : Py_False,
                       "openmp", kWithOpenMP ? Py_True : Py_False, "debug", kDebugBuild ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "How the extension was built: the torch version compiled against, and whether CUDA kernels, OpenMP and "
     "debug flags are in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_C", "Native kernels of elva_kernels.", -1, methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
