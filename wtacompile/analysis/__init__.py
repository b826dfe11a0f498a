"""The graph adapter: AOTAutograd traces of a captured graph, turned into names and numbers.

* :mod:`.partition_trace` — run a dynamo graph through AOTAutograd with the inner compiler's
  decompositions and partitioner, and keep the joint graph and its forward/backward split.
* :mod:`.forked` — run the traces of one graph that need nothing from each other at the same
  time, in forked processes (within a plan).
* :mod:`.graph_numbers` — read that split as numbers: saved bytes, the backward's live-bytes
  curve, sizes as functions of the batch, and provenance keys matching two traces' tensors.

Everything downstream (:mod:`wtacompile.memory_model`, :mod:`wtacompile.solver`) sees only numbers.
"""
