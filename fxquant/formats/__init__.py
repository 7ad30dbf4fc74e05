"""The artifacts fxquant writes and reads back: the Ascend checkpoint (msModelSlim / vllm-ascend
weight format), quantized ONNX (QDQ or Ascend ops) with its reference runtime, and the
safetensors folders under both."""
