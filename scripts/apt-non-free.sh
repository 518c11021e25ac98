#!/bin/sh
# Offer Debian's contrib and non-free sections to apt, once: SVOX Pico (libttspico-utils),
# RHVoice's English voices (rhvoice-english) and MBROLA's voice en1 (mbrola-en1) live in non-free,
# the MBROLA synthesizer (mbrola) in contrib.
#
# Does nothing off Debian, when pico2wave, RHVoice-test and mbrola are already installed, or when
# our source file exists and names both sections.
# The entry names the same keyring as the machine's own deb.debian.org source: apt refuses two
# entries for one archive and suite whose Signed-By options differ ("Conflicting values set for
# option Signed-By"), which a plain "deb URL SUITE non-free" line causes beside a deb822
# debian.sources that sets Signed-By (the stock Debian 12 images).
set -eu
TARGET=/etc/apt/sources.list.d/emformer-asr-non-free.list
[ -r /etc/os-release ] || exit 0
. /etc/os-release
[ "${ID:-}" = debian ] || exit 0
command -v pico2wave >/dev/null 2>&1 && command -v RHVoice-test >/dev/null 2>&1 \
    && command -v mbrola >/dev/null 2>&1 && exit 0
[ -e "$TARGET" ] && grep -q " contrib non-free" "$TARGET" && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# The Signed-By of the machine's deb.debian.org source: a deb822 stanza (Signed-By: PATH) or a
# one-line entry (deb [signed-by=PATH] URL ...); empty when it sets none.
keyring=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    keyring=$(awk 'BEGIN { RS = ""; FS = "\n" }
        /deb\.debian\.org\/debian([^-]|$)/ { for (i = 1; i <= NF; i++) if ($i ~ /^Signed-By:/) {
            sub(/^Signed-By:[ \t]*/, "", $i); print $i; exit } }' "$f")
    [ -n "$keyring" ] && break
done
if [ -z "$keyring" ]; then
    keyring=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -n 's#^deb .*signed-by=\([^] ]*\).*deb\.debian\.org/debian[ /].*#\1#p' | head -n 1)
fi
options=""
[ -n "$keyring" ] && options="[signed-by=$keyring] "
echo "deb ${options}http://deb.debian.org/debian ${VERSION_CODENAME} contrib non-free" | $SUDO tee "$TARGET" >/dev/null
echo "apt: added Debian's contrib and non-free sections (${TARGET})"
