import sys

from vlm_lora.cli import main

sys.exit(main())
