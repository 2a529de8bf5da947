"""``python -m nsclean.report``: rebuild a report from per-exposure JSON records."""

import sys

from .report import main

sys.exit(main())
