"""prefdata: build preference datasets for LLM alignment, and train on them."""

__version__ = "0.1.0"
