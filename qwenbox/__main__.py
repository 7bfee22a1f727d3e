import sys

from .cli import main

if __name__ == "__main__":  # vLLM's engine children re-import __main__ (spawn): keep the guard
    sys.exit(main())
