"""The TVM engine: ONNX -> Relax -> compiled engine (``compile``), with the oneDNN kernels it
calls (``kernels``). It takes an ONNX path and knows nothing of models or backends."""
