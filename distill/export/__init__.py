"""The exported student: structure checks and the Hugging Face layout (verify), the packed format's
transformers quantization method (hf_quantizer, registration) and the model cards."""
