#!/bin/sh
# Both packages run as the same system user; create it once.
set -e
getent group storage-events >/dev/null || groupadd --system storage-events
getent passwd storage-events >/dev/null || useradd --system --gid storage-events \
    --home-dir /var/lib/storage-events --no-create-home --shell /usr/sbin/nologin \
    --comment "storage-events" storage-events
exit 0
