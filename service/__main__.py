"""`python -m service` is the same as `glm-serve`."""

from service.cli import main

if __name__ == "__main__":  # the engine process (spawn) imports this module again; it must not serve
    raise SystemExit(main())
