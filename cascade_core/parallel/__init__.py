"""Several devices, one video: the parts of :mod:`cascade_core.distributed` (its docstring describes
the whole), one job per module.

- :mod:`.devices`: the device list syntax, checked against the machine.
"""
