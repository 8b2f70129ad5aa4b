import sys

from lminf_jax.cli.app import main

sys.exit(main())
