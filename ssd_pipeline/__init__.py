"""ssd_pipeline: a conformance and benchmark suite for mmdetection's SSD300.

Artifacts flow one way (config + checkpoint -> ONNX -> simplified ONNX -> engine) and so
does data (dataset -> preprocess -> backend -> postprocess -> metric); one module per stage.
"""

__version__ = "0.1.0"
