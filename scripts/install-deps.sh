#!/usr/bin/env bash
# Installs what the demo and the tests need, skipping what is already there:
# moto server and the AWS CLI (PyPI), and name resolution of *.localhost (Debian's
# libnss-myhostname, for S3 Control on loopback); with --all also cargo-lambda and the
# IAM linter parliament (PyPI), and the Debian package for the shell linter. Safe to
# run any number of times.
set -euo pipefail

usage() { echo "usage: $0 [--all]"; }
all=false
case "${1:-}" in
  "") ;;
  --all) all=true ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

pip_install() {
  local command_name=$1 package=$2
  if command -v "$command_name" >/dev/null 2>&1; then
    echo "==> $command_name: present ($(command -v "$command_name"))"
  else
    echo "==> $command_name: installing $package with pip"
    python3 -m pip install --quiet --disable-pip-version-check "$package"
    # pyenv installs need their shims refreshed before the new command is on PATH.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
    command -v "$command_name" >/dev/null 2>&1 || { echo "error: $command_name still not on PATH after pip install $package" >&2; exit 1; }
  fi
}

pip_install moto_server 'moto[server]'
pip_install aws awscli

# The SDK sends every S3 Control call to {AccountId}.{endpoint host}: the tests point
# it at http://localhost:PORT, so 123456789012.localhost must resolve to loopback.
# glibc does not resolve *.localhost by itself; nss-myhostname does (its package puts
# "myhostname" after "files" in /etc/nsswitch.conf, before any DNS lookup).
if getent ahosts 123456789012.localhost >/dev/null 2>&1; then
  echo "==> *.localhost: resolves"
else
  echo "==> *.localhost: installing libnss-myhostname with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnss-myhostname >/dev/null
  getent ahosts 123456789012.localhost >/dev/null 2>&1 || { echo "error: 123456789012.localhost still does not resolve; add 'myhostname' to the hosts line of /etc/nsswitch.conf" >&2; exit 1; }
fi
if $all; then
  pip_install cargo-lambda cargo-lambda
  pip_install parliament parliament
  if command -v shellcheck >/dev/null 2>&1; then
    echo "==> shellcheck: present"
  else
    echo "==> shellcheck: installing with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
  fi
fi
