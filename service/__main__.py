"""`python -m service` is the same as `glm-serve`."""

from service.cli import main

raise SystemExit(main())
