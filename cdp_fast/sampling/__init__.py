"""The driver: :func:`sample` runs the solvers over a whole run (validation, model
preparation, batches, the whole-step CUDA graph of :mod:`.graphs`) and streams it to resumable
shards (:mod:`.stream`)."""
from cdp_fast.sampling.driver import sample

__all__ = ["sample"]
