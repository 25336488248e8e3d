"""A promoter in its own process, for the race and kill tests: ``python promoter.py ...``.

It imports everything first, says it is ready, waits for the go file (a start
barrier, so the promoters really race), promotes, and prints the result as JSON.
"""

import json
import sys
import time
from pathlib import Path


def main() -> int:
    uri, model, version, stage, barrier = sys.argv[1:6]
    import registry  # heavy imports before the barrier

    barrier_dir = Path(barrier)
    (barrier_dir / f"ready-{version}-{stage}").touch()
    while not (barrier_dir / "go").exists():
        time.sleep(0.01)
    try:
        result = registry.promote(model, version, stage, f"race {version}", tracking_uri=uri)
    except registry.Refused as refused:
        print(json.dumps({"refused": str(refused)}))
        return 1
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
