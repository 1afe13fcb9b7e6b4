#!/bin/sh
# The command dispatch of the official Consul image's entrypoint.
set -e
case "$1" in
    -*) set -- consul "$@" ;;
esac
if [ "$1" = agent ]; then
    shift
    set -- consul agent -data-dir=/consul/data -config-dir=/consul/config "$@"
elif [ "$1" = version ] || consul --help "$1" 2>&1 | grep -q "consul $1"; then
    set -- consul "$@"
fi
exec "$@"
