import sys

from serving.serve.launch import main

sys.exit(main())
