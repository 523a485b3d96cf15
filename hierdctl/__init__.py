"""hierdctl: distil CLIP-style teachers into small retrieval students, from a cached teacher."""

__version__ = "0.1.0"
