"""ddim-deploy's exporter: trainer checkpoints to ONNX, FP16 ONNX and TensorRT engines."""
