import sys

from fastops.train import main

sys.exit(main())
