import sys

try:
    from .cli.command import main
except KeyboardInterrupt:  # Ctrl-C while torch is still being imported
    print("interrupted before the run started", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
