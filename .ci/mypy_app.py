"""The app's type check against its baseline: mypy's error count in jaxelbo/app may only shrink.

    python .ci/mypy_app.py            # fails if jaxelbo/app has more errors than .ci/mypy-app-baseline.json
    python .ci/mypy_app.py --update   # rewrite the baseline after fixing errors (it may only go down)

The core (jaxelbo/ minus jaxelbo/app) is checked by plain `mypy` at zero errors; see CONTRIBUTING.md.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-app-baseline.json"
ERROR = re.compile(r"^(jaxelbo/app/[^:]+\.py):\d+: error:")


def counts() -> tuple[dict[str, int], str]:
    out = subprocess.run([sys.executable, "-m", "mypy", "jaxelbo/app"], cwd=ROOT, capture_output=True, text=True)
    found = collections.Counter(m.group(1) for line in out.stdout.splitlines() if (m := ERROR.match(line)))
    return dict(sorted(found.items())), out.stdout


def main(argv: list[str]) -> int:
    found, report = counts()
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    if "--update" in argv:
        if sum(found.values()) > sum(baseline.values()) and "--force" not in argv:
            print("refusing to raise the baseline (fix the new errors)")
            return 1
        BASELINE.write_text(json.dumps(found, indent=1) + "\n")
        print(f"baseline: {sum(found.values())} errors in {len(found)} files")
        return 0
    worse = {f: (n, baseline.get(f, 0)) for f, n in found.items() if n > baseline.get(f, 0)}
    total, allowed = sum(found.values()), sum(baseline.values())
    if total > allowed:
        print("\n".join(line for line in report.splitlines() if ERROR.match(line)))
        for f, (n, b) in worse.items():
            print(f"mypy: {f} has {n} errors, baseline {b} (mypy {f})")
        print(f"mypy (app): {total} errors, more than the baseline's {allowed}: fix the new ones")
        return 1
    print(f"mypy (app): {total} errors, baseline {allowed}"
          + ("; the baseline may shrink: python .ci/mypy_app.py --update" if total < allowed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
