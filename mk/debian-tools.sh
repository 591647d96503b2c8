#!/usr/bin/env bash
# Unpacks Debian's prometheus (prometheus, promtool) and dnsmasq-base (dnsmasq) into DEST without
# installing them: `apt-get download` + `dpkg -x`, so that no service is started, no system file changes,
# and nothing but the Debian archive (a package registry, which CI reaches) is needed.
#
# dnsmasq is dynamically linked: the shared libraries it needs that this machine lacks (on Debian 12's
# base image: libnetfilter-conntrack3, libnftables1 and theirs) are unpacked beside it, and DEST/bin/dnsmasq
# is a wrapper that puts them on LD_LIBRARY_PATH. Prometheus and promtool are static Go binaries; their
# package's dependencies (the classic web UI's JavaScript, adduser) are not needed to run them.
#
# Usage: mk/debian-tools.sh DEST   (called by mk/debian-tools.mk, which keeps a stamp)
set -euo pipefail
DEST=$1
PACKAGES=(prometheus dnsmasq-base)

# `apt-get update` only when the package lists do not know the packages (a fresh image ships none).
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "debian-tools: apt package lists lack ${PACKAGES[*]}; run 'apt-get update' as root" >&2
        exit 1
    fi
    apt-get update -qq
fi

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

# Shared-library packages (lib*) that PACKAGES need, transitively, and this machine has not installed.
# For an alternative group (`A | B`) nothing is added when one member is installed, else the first member.
missing_libraries() {
    local queue=("$@") seen=" " pkg
    while [ ${#queue[@]} -gt 0 ]; do
        pkg=${queue[0]}
        queue=("${queue[@]:1}")
        apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
            --no-enhances "$pkg" |
            awk '/^ *\|?(Pre)?Depends:/ { alt = ($1 ~ /^\|/); name = $2;
                     group = group " " name; if (!alt) { print group; group = "" } }' >"$DEST/.deps"
        while read -r -a group; do
            local chosen="" member
            for member in "${group[@]}"; do
                if installed "$member"; then chosen=""; continue 2; fi
                [ -z "$chosen" ] && chosen=$member
            done
            case $chosen in lib*) ;; *) continue ;; esac
            case $seen in *" $chosen "*) continue ;; esac
            seen="$seen$chosen "
            echo "$chosen"
            queue+=("$chosen")
        done <"$DEST/.deps"
    done
}

rm -rf "$DEST" && mkdir -p "$DEST/debs" "$DEST/root" "$DEST/bin"
mapfile -t LIBRARIES < <(missing_libraries dnsmasq-base)
# apt's download sandbox user (_apt) cannot write into a root-owned work tree; as root, download as root.
SANDBOX=()
[ "$(id -u)" = 0 ] && SANDBOX=(-o APT::Sandbox::User=root)
(cd "$DEST/debs" && apt-get -qq "${SANDBOX[@]}" download "${PACKAGES[@]}" "${LIBRARIES[@]}")
for deb in "$DEST"/debs/*.deb; do dpkg -x "$deb" "$DEST/root"; done

LIBRARY_PATH=$(find "$DEST/root" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
cat >"$DEST/bin/dnsmasq" <<EOF
#!/bin/sh
# Debian's dnsmasq unpacked by mk/debian-tools.sh, with the shared libraries unpacked beside it.
LD_LIBRARY_PATH="$LIBRARY_PATH\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$DEST/root/usr/sbin/dnsmasq" "\$@"
EOF
chmod 0755 "$DEST/bin/dnsmasq"
ln -sf "$DEST/root/usr/bin/prometheus" "$DEST/bin/prometheus"
ln -sf "$DEST/root/usr/bin/promtool" "$DEST/bin/promtool"

# Fail here, with the reason, rather than in a test: every binary must start.
if LD_LIBRARY_PATH=$LIBRARY_PATH ldd "$DEST/root/usr/sbin/dnsmasq" | grep 'not found'; then
    echo "debian-tools: dnsmasq still lacks the libraries above" >&2
    exit 1
fi
"$DEST/bin/dnsmasq" --version | head -1
"$DEST/bin/prometheus" --version 2>&1 | head -1
"$DEST/bin/promtool" --version 2>&1 | head -1
rm -rf "$DEST/debs" "$DEST/.deps"
