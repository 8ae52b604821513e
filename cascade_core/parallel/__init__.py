"""Several devices, one video: the parts of :mod:`cascade_core.distributed` (its docstring describes
the whole and re-exports the public API), one job per module.

- :mod:`.devices`: the device list syntax checked against the machine, and the host's facts.
- :mod:`.wire`: tensors, the weights' plan and chunks, and the job, across process boundaries.
- :mod:`.partition`: a tick's blocks over the ranks and the per-layer k/v all-gather.
- :mod:`.rank`: the per-rank engine, also for a process group made by torchrun.
- :mod:`.worker`: the worker process, imported by its stable name.
- :mod:`.processes`: the worker processes on the caller's side: start, watch, fail, stop.
- :mod:`.pool`: the pool's jobs on the caller's side (weights, memory check, runs), and the module's pool.
- :mod:`.faults`: a rank's failures and the one message composed from them.
"""
