"""Quickstart: the offline demo that `usage-callbacks demo` runs.

LangChain and LlamaIndex calls on the frameworks' fake models are recorded into the
embedded SQLite default (./usage.db, or $USAGE_CALLBACKS_DB), a per-user daily budget
refuses a call before it is made, and a summary is printed.

    python examples/quickstart.py
"""

import sys

from usage_callbacks.demo import main

if __name__ == "__main__":
    sys.exit(main())
