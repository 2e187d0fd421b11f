"""Video-language model adapters."""
