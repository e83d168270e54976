"""Run `python -m training` as `cnn-train`."""

from training.cli import main

raise SystemExit(main())
