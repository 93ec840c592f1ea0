"""A process that holds the promotion lock for a while and prints when it got it and let it go (tests/test_locks.py
and tests/test_stack.py run two at once)."""

import json
import sys
import time

from stages.lib.locks import promotion_lock

uri, hold = sys.argv[1], float(sys.argv[2])
with promotion_lock(uri) as held:
    got = time.time()
    time.sleep(hold)
    print(json.dumps({"got": got, "released": time.time(), **held}), flush=True)
