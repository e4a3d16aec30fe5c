"""Stands in for pip's get-pip.py in ansible-test's cache (tools/sanity.py says why):
pip from Python's ensurepip, then `pip install` of what ansible-test asks for."""

import subprocess
import sys

# ensurepip runs in its own process: in this one it would set PIP_CONFIG_FILE=/dev/null,
# and the install below would lose the machine's pip config (its CA bundle, its index).
subprocess.check_call([sys.executable, "-m", "ensurepip"])
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
