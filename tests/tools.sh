#!/usr/bin/env bash
# Debian tools some tests drive for real: promtool (alert rules) and stunnel4 (TLS and mutual-TLS Kafka).
# Installs what is missing when it can (root with apt-get), else says exactly what to install and fails:
# a missing tool never turns into skipped tests.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages for the tests: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The prometheus package starts a server on some systems; the tests need only its promtool.
  if command -v systemctl >/dev/null; then systemctl stop prometheus >/dev/null 2>&1 || true; fi
  exit 0
fi
echo "the tests need these Debian packages: ${need[*]} (sudo apt-get install -y --no-install-recommends ${need[*]})" >&2
exit 1
