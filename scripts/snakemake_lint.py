#!/usr/bin/env python3
"""`snakemake --lint`, minus the one lint that cannot apply here.

Snakemake asks for a conda env or `container:` on every rule; its container directive is
Apptainer-only, and cellbench's rules run their engines in Docker themselves (pinned images,
manifests as inputs), so that lint is expected. Every other lint fails the check.
"""

import re
import subprocess
import sys

EXPECTED = "Specify a conda environment or container for each rule."

done = subprocess.run(["snakemake", "--lint", "--cores", "1", *sys.argv[1:]], capture_output=True, text=True)
output = done.stdout + done.stderr
lints = re.findall(r"^\s+\* (.+?):?$", output, re.MULTILINE)
unexpected = [lint for lint in lints if lint.rstrip(":") != EXPECTED]
if unexpected or ("Lints for" not in output and done.returncode):
    print(output)
    print(f"snakemake lint: {len(unexpected)} unexpected lint(s): {sorted(set(unexpected))}", file=sys.stderr)
    sys.exit(1)
print(f"snakemake lint: ok ({len(lints)} expected 'conda env or container' lints, one per rule)")
