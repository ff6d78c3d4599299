"""`python -m bench`: what `bench/run` runs, in the benchmark's tool environment."""

from bench.cli import main

raise SystemExit(main())
