"""Single machine: serve every deployment of the given configs and watch their landing zones.

    prefect server start                       # terminal 1 (UI on http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py configs/sms-spam-landing.yaml    # same as: tuneflow serve --config ...

The deployments themselves are declared in flows/serve.py (from each config's schedule,
landing zone and model name); deployments/prefect.yaml declares the same ones for workers.
"""

import sys

from tuneflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *(a for p in sys.argv[1:] for a in ("--config", p))]))
