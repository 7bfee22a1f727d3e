#!/bin/sh
# /usr/bin/qwenbox (Debian package): the app's code in /usr/lib/qwenbox/app, run by the
# runtime package's interpreter (its site-packages has a .pth file naming the app's dir).
# No __pycache__ is written into /usr/lib (dpkg would leave it behind on purge).
PYTHONDONTWRITEBYTECODE=1 exec /usr/lib/qwenbox/runtime/bin/python -m qwenbox "$@"
