"""Quickstart: the offline demo that `usage-callbacks demo` runs.

LangChain and LlamaIndex calls on the frameworks' fake models are recorded into a fresh
SQLite database of the demo's own (or the URL given), the budget of alice's session
refuses a call before it is made, and what the run recorded is printed.

    python examples/quickstart.py
"""

import sys

from usage_callbacks.demo import main

if __name__ == "__main__":
    sys.exit(main())
