"""`python -m deqfusion.upstream ...`: what apply_patches.sh runs."""
import sys

from .cli import main

sys.exit(main())
