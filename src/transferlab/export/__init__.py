"""Shipping a trained model: ONNX/TorchScript export with proven parity, batch prediction over any model
kind, an HTTP server and inference benchmarks. Submodules load on use: the ONNX predict and serve path
never imports torch."""
