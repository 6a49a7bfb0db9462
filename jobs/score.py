"""Score traces with ln-ray: the entry point for ``ray job submit`` and for local runs.

ray job submit --working-dir . -- python jobs/score.py --config-name cluster input.path=s3://...
python jobs/score.py scoring.window=2          # local Ray (or the cluster named by RAY_ADDRESS)
"""

import sys

from ln_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
