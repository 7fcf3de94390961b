"""`python -m qzo2 ...`: the `qzo2` command, also as launched by `torchrun -m qzo2 train ...` and
`accelerate launch -m qzo2 train ...`."""
import sys

from .cli import main

sys.exit(main())
