#!/usr/bin/env bash
# Installs the Debian packages of requirements/system-packages.txt that are missing (as root).
# No service is started by the install: the tests start their own sshd and PostgreSQL on free
# ports of 127.0.0.1, so a policy-rc.d denies service starts while apt-get runs (Docker images
# ship one; else one is made for the install and removed after), and a system sshd that still
# got started is stopped.
set -euo pipefail
cd "$(dirname "$0")"
packages=()
while read -r package path _; do
    [[ -z "$package" || "$package" == \#* ]] && continue
    compgen -G "$path" >/dev/null || packages+=("$package")
done <system-packages.txt
if [ ${#packages[@]} -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system packages: ${packages[*]} missing; installing them needs root: sudo make system-packages" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "system packages: ${packages[*]} missing, and this is not a Debian-like system (no apt-get): install them with its package manager" >&2
    exit 1
fi
echo "installing Debian's ${packages[*]} ..."
apt-get update -qq
made_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
if [[ " ${packages[*]} " == *" openssh-server "* && -s /run/sshd.pid ]]; then  # started anyway
    echo "stopping the system sshd the install started ..."
    kill "$(cat /run/sshd.pid)" 2>/dev/null || true
fi
