"""`torchrun --nproc-per-node N -m llama.parallel --model PATH`: check a multi-GPU setup."""

import sys

from llama.parallel.check import main

sys.exit(main())
