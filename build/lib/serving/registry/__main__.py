import sys

from serving.registry.cli import main

sys.exit(main())
