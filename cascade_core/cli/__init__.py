"""The command line: ``python -m cascade_core generate|decode`` (:mod:`.parser`: its options; :mod:`.checks`:
its refusals before any model work; :mod:`.run`: the runs; :mod:`.prefix`: ``--image`` / ``--continue``)
and the benchmarks ``python -m cascade_core.bench`` (:mod:`.bench`, its options :mod:`.bench_args`) and
``python -m cascade_core.cli.bench_memory`` (runs on capped GPU memory, :mod:`.bench_memory`) and
``python -m cascade_core.cli.bench_v2v`` (video-to-video: frames in to restyled frames out, :mod:`.bench_v2v`).
A frontend: it may import every other sub-package but :mod:`cascade_core.client`."""
