"""The artifact chain: config + checkpoint --export--> ONNX --onnxsim--> simplified ONNX,
each step cached by content (``chain.ModelArtifacts``)."""
