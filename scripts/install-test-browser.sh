#!/bin/sh
# The web page's tests drive a real headless Chromium through Selenium (tests/serving/test_browser.py).
# This installs Debian's chromium + chromium-driver when we may (root with apt); otherwise those tests
# skip and say which packages would run them.
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
[ "$(uname -s)" = "Linux" ] || exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium + chromium-driver (for the web page's browser tests)..."
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }) \
        || echo "Could not install chromium; the browser tests will be skipped." >&2
else
    echo "Tip: 'sudo apt-get install chromium chromium-driver' runs the web page's browser tests." >&2
fi
exit 0
