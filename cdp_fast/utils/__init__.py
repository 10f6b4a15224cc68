"""Leaves of the package: argument checks, per-sample seeding, devices and compile helpers,
torchrun glue, atomic file writes, checkpoint integrity (:mod:`.checkpoint`) and PNG output.
Nothing here imports from the rest of cdp_fast (docs/design.md, "Layers")."""
__all__ = []   # a namespace: the leaves are its submodules
