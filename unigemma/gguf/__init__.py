"""GGUF import: reader (metadata, tensor table), dequantizers, and the gemma3 / gemma4 loaders."""
