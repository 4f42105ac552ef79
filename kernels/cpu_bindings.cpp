// The Python module of the CPU kernels (kernels/cpu.py builds it from the three sources).
//
// The GIL: torch's own ops release it while they run, so another Python thread (a server's event
// loop) can take it; the thread that released it then waits for it back, up to the interpreter's
// switch interval (5 ms) when the other thread is busy in Python. A decode step makes ~240 short
// kernel calls (a linear layer 0.02-0.1 ms, a layer's attention ~0.2 ms, the output layer a few ms):
// releasing the GIL in each made the app's stream to a browser on this 2-core CPU ~15% slower (a
// convoy behind the server's event loop), so those hold it. The dequantisers (a prefill's weights,
// one call per layer and forward) release it.
#include <torch/extension.h>

std::vector<torch::Tensor> decode_layer(torch::Tensor q, std::vector<torch::Tensor> tensors,
                                        std::vector<int64_t> meta, double softcap);
torch::Tensor q4_1_mm(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_0_mm(torch::Tensor x, torch::Tensor qs, torch::Tensor d);
torch::Tensor q4_1_dequant(torch::Tensor qs, torch::Tensor d, torch::Tensor m, torch::Tensor out);
torch::Tensor q8_0_dequant(torch::Tensor qs, torch::Tensor d, torch::Tensor out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("decode_layer", &decode_layer,
        "one decode step of one layer over dense and packed parts (softcap c > 0: logits c tanh(z / c) before "
        "the parts' bias; 0: off)",
        py::arg("q"), py::arg("tensors"), py::arg("meta"), py::arg("softcap") = 0.0);
  m.def("q4_1_mm", &q4_1_mm, "x @ W^T with W in GGUF Q4_1 blocks (small M)");
  m.def("q8_0_mm", &q8_0_mm, "x @ W^T with W in GGUF Q8_0 blocks (small M)");
  m.def("q4_1_dequant", &q4_1_dequant, "Q4_1 blocks -> fp32 W (into out unless it is empty), rounded as gguf-py does",
        release());
  m.def("q8_0_dequant", &q8_0_dequant, "Q8_0 blocks -> fp32 W (into out unless it is empty)", release());
}
