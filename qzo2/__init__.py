"""qzo2: quantization-first, memory-lean zeroth-order fine-tuning of large language models."""
__version__ = "0.1.0"
