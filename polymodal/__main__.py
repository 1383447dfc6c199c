"""`python -m polymodal ...`: the same command line as the `polymodal` script, which torchrun
needs to start one process per device (`torchrun --nproc-per-node N -m polymodal train CONFIG`)."""
import sys

from polymodal.cli import main

sys.exit(main())
