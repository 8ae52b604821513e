"""``python -m cascade_core.bench``: the benchmark's command (it lives in :mod:`cascade_core.cli.bench`)."""
if __name__ == "__main__":
    from cascade_core.cli.bench import main

    main()
