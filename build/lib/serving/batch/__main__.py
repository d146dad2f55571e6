import sys

from serving.batch.scoring import main

sys.exit(main())
