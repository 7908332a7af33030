// memtrain._C: the native parts of memtrain, bound with pybind11 (no torch headers needed to build).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "swap/io_engine.h"

namespace py = pybind11;
using memtrain::IOEngine;

PYBIND11_MODULE(_C, m) {
  m.doc() = "memtrain native extension: asynchronous file I/O for the swap pipeline";
  m.def("io_uring_compiled", &memtrain::io_uring_compiled, "whether this build links liburing");
  py::class_<IOEngine>(m, "IOEngine")
      .def(py::init<int, int64_t, int, const std::string&>(), py::arg("queue_depth"), py::arg("block_size"),
           py::arg("threads"), py::arg("backend"))
      .def("submit", &IOEngine::submit, py::arg("path"), py::arg("ptr"), py::arg("nbytes"), py::arg("offset"),
           py::arg("write"), py::arg("direct"))
      .def("wait", &IOEngine::wait, py::arg("handle"), py::call_guard<py::gil_scoped_release>())
      .def("done", &IOEngine::done, py::arg("handle"))
      .def("stats",
           [](IOEngine& e) {
             auto s = e.stats();
             py::dict d;
             d["bytes_read"] = s.bytes_read;
             d["bytes_written"] = s.bytes_written;
             d["reads"] = s.reads;
             d["writes"] = s.writes;
             d["read_seconds"] = s.read_seconds;
             d["write_seconds"] = s.write_seconds;
             d["max_blocks_in_flight"] = s.max_blocks_in_flight;
             d["direct_requests"] = s.direct_requests;
             return d;
           })
      .def_property_readonly("backend", &IOEngine::backend)
      .def_property_readonly("block_size", &IOEngine::block_size)
      .def_property_readonly("queue_depth", &IOEngine::queue_depth);
}
