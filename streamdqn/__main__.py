import sys

from streamdqn.cli import main

sys.exit(main())
